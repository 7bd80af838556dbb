"""Benchmark of one ternary QAT + distillation training step against plain fp32 fine-tuning.

    HF_HUB_OFFLINE=1 python benchmarks/bench_qat.py             # MiniLM + random small LLaMA (see timing note)
    HF_HUB_OFFLINE=1 python benchmarks/bench_qat.py --full      # MiniLM + SmolLM2-135M (pretrained, slower)
    python benchmarks/bench_qat.py --models llama --batch 4 --seq-len 64 --repeats 5

Prints ONE JSON object on stdout; progress goes to stderr. Per model, in the SAME process,
the step kinds (`--configs`, default all) are timed interleaved (A A16 A0 B C W H, again ...), so
that a noisy, shared machine skews them alike:

- A "qat_distill": one step exactly as compressor.train.train_qat takes it in a run of 200+
  steps (fused kernels on, compressor/fused.py): student = prepare(copy.deepcopy(model),
  TernaryConfig()), lambda = 1, teacher in eval mode without gradients, distill_losses (teacher
  forward under no_grad + student forward; KD + block hidden-state losses through BlockOutputs
  hooks; next-token CE for causal LMs), backward, clip_grad_norm_, AdamW step, LR-scheduler
  step, zero_grad(set_to_none=True). Per-step logging/checkpointing of train_qat is not
  included. Before timing, the replica is checked against train_qat itself (2 steps on
  identical fresh students, both fused: weights must match).
- A16: A with teacher_dtype="bf16"; A0: A with eager kernels (fused="off").
- B "fp32_finetune": the original float model (a copy), no teacher, no quantization; loss =
  next-token CE for the LM, MSE of the last hidden state against a fixed random target for the
  encoder; same clipping / AdamW / scheduler.
- C "qat_no_teacher": the prepared (fake-quant, lambda = 1) student with B's task loss only:
  C/B is the cost of fake quantization, A/C the cost of distillation.
- W / H: a W1.58A8 student (ternary per-tensor weights, int8 per-token activations; fused) and
  the same model with transformers' AutoBitLinear(online_quant=True) in place of the block
  Linears, both with B's loss: W/H compares the two QAT layers.

All run in eval mode (dropout off), as train_qat runs its student.

Timing note: torch's default thread count is used unless --threads is given. On a machine that
other torch jobs share, the default (one thread per core) suffers badly from oversubscription:
the default run takes ~90 s on 2 idle cores, but ~10 min on 2 cores shared with two training
jobs (5-10x slower, bimodal step times), where `--threads 1` ran the same steps 5-10x faster
and steadier. Compare ratios, not absolute times, and prefer --threads 1 on a busy machine.

Peak memory: each configuration runs again, alone, in its own subprocess (this script with
`--config A|B|C --model KEY`), which reports the high-water mark of its own resident set
(VmHWM in /proc/self/status) over 2 steps (the 2nd holds activations, gradients and AdamW
state at once), after resetting it once the model is loaded
(/proc/self/clear_refs = 5), and also over the whole process. getrusage(RUSAGE_SELF).ru_maxrss
is reported too, but it is NOT usable here: Linux carries the parent's high-water mark over
exec into the child's ru_maxrss, so every child would report at least the parent's peak.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tritpress.compressor import TernaryConfig, discover, load_model, prepare, set_lambda  # noqa: E402
from tritpress.compressor.fused import fused_kernels  # noqa: E402
from tritpress.compressor.modelio import BlockOutputs, ModelIO  # noqa: E402
from tritpress.compressor.train import (TrainConfig, batch_indices, distill_losses,  # noqa: E402
                              lr_factor, train_qat)

SEED = 0
CONFIGS = {
    "A": "qat_distill: prepare()d student, lambda=1, distill_losses vs frozen teacher, as train_qat runs a run of "
         "200+ steps (fused kernels: fused='auto'), teacher fp32 (the default)",
    "A16": "A with teacher_dtype='bf16' (the teacher's forward under bf16 autocast)",
    "A0": "A with eager kernels (fused='off': what runs under 200 steps, and what every run ran before)",
    "B": "fp32_finetune: original float model, task loss only, no teacher, no quantization",
    "C": "qat_no_teacher: prepare()d student (fused kernels), lambda=1, task loss only (B's loss), no teacher",
    "W": "W1.58A8 student, no teacher: prepare(TernaryConfig(act_bits=8, granularity='tensor', embedding/head fp32)), "
         "fused kernels, B's loss",
    "H": "HF AutoBitLinear(online_quant=True) in place of the same Linears (transformers' W1.58A8 QAT layer: "
         "torch.compile'd weight and activation quantizers), B's loss",
}
DISTILLING = ("A", "A16", "A0")  # the configurations with a teacher
RATIOS = {"A_over_B": ("A", "B"), "A16_over_B": ("A16", "B"), "A0_over_B": ("A0", "B"), "C_over_B": ("C", "B"),
          "A_over_C": ("A", "C"), "W_over_H": ("W", "H")}
MODEL_KEYS = ("minilm", "llama", "smollm2-arch")
# SmolLM2-135M's architecture with random weights: GPU timing needs no weight file
SMOLLM2_ARCH = dict(hidden_size=576, num_hidden_layers=30, vocab_size=49152, intermediate_size=1536,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
DEVICE = torch.device("cpu")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def autocast():
    # as train_qat: bf16 autocast on CUDA, plain fp32 on CPU
    return torch.autocast("cuda", dtype=torch.bfloat16) if DEVICE.type == "cuda" else contextlib.nullcontext()
TINY_LLAMA = dict(hidden_size=256, num_hidden_layers=4, vocab_size=8192, intermediate_size=768,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  tie_word_embeddings=True)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mb(kb: int) -> float:
    return round(kb / 1024, 1)


# ------------------------------------------------------------------ models

def load(key: str, full: bool):
    """-> (model, description dict)."""
    if key == "minilm":
        lm = load_model("pkg:all-MiniLM-L6-v2")
        return lm.model, {"name": "all-MiniLM-L6-v2", "source": "pkg:all-MiniLM-L6-v2 (pretrained BERT encoder)",
                          "pretrained": True, "model_class": lm.source.model_class}
    if full:
        lm = load_model("pkg:SmolLM2-135M")
        return lm.model, {"name": "SmolLM2-135M", "source": "pkg:SmolLM2-135M (pretrained LLaMA decoder, "
                          "weights dequantized from GGUF Q4_1)", "pretrained": True,
                          "model_class": lm.source.model_class}
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(SEED)
    if key == "smollm2-arch":
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_ARCH)).float().eval()
        return model, {"name": "smollm2-arch-random",
                       "source": f"LlamaForCausalLM(LlamaConfig(**{SMOLLM2_ARCH})): SmolLM2-135M's architecture, "
                                 f"RANDOMLY INITIALIZED (timing only)", "pretrained": False,
                       "model_class": type(model).__name__, "config": SMOLLM2_ARCH}
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).float().eval()
    return model, {"name": "llama-tiny-random",
                   "source": f"transformers LlamaForCausalLM(LlamaConfig(**{TINY_LLAMA})), RANDOMLY INITIALIZED "
                             f"(torch.manual_seed({SEED})); use --full for pretrained SmolLM2-135M",
                   "pretrained": False, "model_class": type(model).__name__, "config": TINY_LLAMA}


def make_batch(model, io: ModelIO, batch: int, seq_len: int):
    """Fixed random token ids (timing does not depend on their values) and, for encoders,
    the fixed random target of the MSE task loss."""
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=g)
    target = None
    if not io.causal:
        with torch.no_grad():
            width = io.forward(model, ids[:1].to(DEVICE)).shape[-1]
        target = torch.randn(batch, seq_len, width, generator=g).to(DEVICE)
    return ids.to(DEVICE), target


def train_config(n_params: int, steps: int, batch: int, seq_len: int, **fields) -> TrainConfig:
    # lambda = 1 from the first step; no checkpoints
    return TrainConfig(steps=steps, seq_len=seq_len, batch_size=batch, quant_schedule="none",
                       checkpoint_every=0, **fields).resolved(n_params)


# what each configuration changes in the TrainConfig (A's fused='on' is what 'auto' picks for 200+ steps)
TRAIN_FIELDS = {"A": {"fused": "on"}, "A16": {"fused": "on", "teacher_dtype": "bf16"}, "A0": {"fused": "off"},
                "B": {"fused": "off"}, "C": {"fused": "on"}, "W": {"fused": "on"}, "H": {"fused": "off"}}
W158A8 = TernaryConfig(act_bits=8, granularity="tensor", embedding="fp32", head="fp32")


def hf_bitlinear(model):
    """The same model with every Linear inside its block stack an HF AutoBitLinear (online quant)."""
    from transformers.integrations.bitnet import AutoBitLinear

    stack = discover(model).blocks.path
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.startswith(stack + "."):
            new = AutoBitLinear(mod.in_features, mod.out_features, bias=mod.bias is not None, online_quant=True)
            new.weight, new.bias = mod.weight, mod.bias
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)
    return model


# ------------------------------------------------------------------ steps

class Stepper:
    """One configuration: a model being trained, its optimizer/scheduler, and its step."""

    def __init__(self, kind: str, model, io: ModelIO, tcfg: TrainConfig, teacher=None, target=None):
        self.kind, self.io, self.tcfg, self.target = kind, io, tcfg, target
        self.distills = kind in DISTILLING
        if self.distills or kind in ("C", "W"):
            model = prepare(model, W158A8 if kind == "W" else TernaryConfig())
            set_lambda(model, 1.0)  # quant_lambda(step) with quant_schedule="none"
        if kind == "H":
            model = hf_bitlinear(model)
        self.model = model.eval()
        self.teacher = teacher
        if self.distills:
            teacher.eval().requires_grad_(False)  # as train_qat
            self.s_blocks = BlockOutputs(model, io.block_paths)
            self.t_blocks = BlockOutputs(teacher, io.block_paths)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, tcfg))
        self.step_no = 0
        self.last_losses: dict[str, float] = {}

    def task_losses(self, ids) -> dict[str, torch.Tensor]:
        out = self.io.forward(self.model, ids)
        if self.io.causal:
            loss = F.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        else:
            loss = F.mse_loss(out, self.target[: len(ids)])
        return {"task": loss, "loss": loss}

    def step(self, ids) -> None:
        # the body of train_qat's loop for one process, no micro-batching, CPU (no autocast)
        if self.kind not in ("B", "H"):
            set_lambda(self.model, 1.0)
        local = len(ids)
        with autocast(), fused_kernels(self.tcfg.fuses):
            if self.distills:
                losses = distill_losses(self.io, self.model, self.teacher, ids, self.s_blocks, self.t_blocks,
                                        self.tcfg)
            else:
                losses = self.task_losses(ids)
            (losses["loss"] * (len(ids) / local)).backward()
        self.last_losses = {k: v.detach().item() for k, v in losses.items()}
        if self.tcfg.grad_clip > 0:
            float(torch.nn.utils.clip_grad_norm_(self.params, self.tcfg.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_no += 1

    def close(self):
        if self.distills:
            self.s_blocks.remove()
            self.t_blocks.remove()


def fresh_copy(model):
    """A trainable deep copy (train_qat leaves the teacher with requires_grad=False; the
    pipeline copies the student before that, when every parameter still requires grad)."""
    return copy.deepcopy(model).requires_grad_(True)


def check_replica(model, structure, io, ids, n_params: int) -> dict:
    """Two steps of train_qat itself vs two steps of Stepper('A') from identical students
    (on a small slice of the batch: it checks the computation, not the speed)."""
    batch, seq_len = ids.shape
    steps = 2
    tcfg = train_config(n_params, steps, batch, seq_len, **TRAIN_FIELDS["A"])
    ref_student = prepare(fresh_copy(model), TernaryConfig())
    rep = Stepper("A", fresh_copy(model), io, tcfg, teacher=model)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_qat_") as tmp:
        findings = train_qat(ref_student, model, structure, ids, tcfg, tmp).findings
    rep_losses = []
    for step in range(steps):
        rep.step(ids[batch_indices(step, len(ids), batch, tcfg.seed)])
        rep_losses.append(rep.last_losses)
    rep.close()
    ref_state, rep_state = ref_student.state_dict(), rep.model.state_dict()
    same_keys = set(ref_state) == set(rep_state)
    max_diff = max((float((ref_state[k].float() - rep_state[k].float()).abs().max())
                    for k in ref_state if k in rep_state and ref_state[k].is_floating_point()), default=0.0)
    loss_diff = max(abs(findings["curve"][i][k] - round(rep_losses[i][k], 6))
                    for i in range(steps) for k in rep_losses[i])
    changed = max(float((ref_state[k].float() - v.float()).abs().max())
                  for k, v in model.state_dict().items() if k in ref_state and v.is_floating_point())
    res = {"steps": steps, "batch": list(ids.shape), "state_dict_keys_match": same_keys,
           "max_abs_weight_diff_vs_train_qat": max_diff,
           "max_abs_logged_loss_diff": loss_diff, "train_qat_losses": [
               {k: v for k, v in e.items() if k in rep_losses[0]} for e in findings["curve"]],
           "weights_moved_from_teacher": changed > 0, "s": round(time.perf_counter() - t, 2)}
    res["ok"] = bool(same_keys and max_diff <= 1e-6 and loss_diff <= 1e-5 and changed > 0)
    del ref_student, rep
    gc.collect()
    return res


# ------------------------------------------------------------------ timing (parent)

def summarize(times: list[float], tokens: int) -> dict:
    med = statistics.median(times)
    return {"median_s": round(med, 4), "min_s": round(min(times), 4), "max_s": round(max(times), 4),
            "tokens_per_s": round(tokens / med, 1), "times_s": [round(t, 4) for t in times]}


def ratio(num: list[float], den: list[float]) -> dict:
    paired = [a / b for a, b in zip(num, den)]
    return {"of_medians": round(statistics.median(num) / statistics.median(den), 3),
            "of_mins": round(min(num) / min(den), 3),
            "paired_median": round(statistics.median(paired), 3),
            "paired_min": round(min(paired), 3), "paired_max": round(max(paired), 3)}


def bench_timing(key: str, args) -> dict:
    log(f"[{key}] load")
    model, desc = load(key, args.full)
    model.to(DEVICE)
    n_params = sum(p.numel() for p in model.parameters())
    structure = discover(model, TernaryConfig().exclude)
    io = ModelIO.discover(model, structure)
    ids, target = make_batch(model, io, args.batch, args.seq_len)
    tokens = ids.numel()
    res = {**desc, "params": n_params, "batch": args.batch, "seq_len": args.seq_len, "tokens_per_step": tokens,
           "blocks_hooked": len(io.block_paths), "has_head": io.has_head, "causal": io.causal,
           "losses": {"A": ("KD (KL on logits) + hidden-state NMSE + next-token CE" if io.causal else
                            "KD (NMSE of last_hidden_state vs teacher) + hidden-state NMSE"),
                      "B": "next-token CE" if io.causal else "MSE(last_hidden_state, fixed random target)",
                      "C": "next-token CE" if io.causal else "MSE(last_hidden_state, fixed random target)"}}
    if not args.no_check and DEVICE.type == "cpu":
        log(f"[{key}] checking the A step against train_qat (2 steps)")
        res["replica_check"] = check_replica(model, structure, io, ids[:2, :32], n_params)
        log(f"[{key}]   replica ok={res['replica_check']['ok']} "
            f"max weight diff={res['replica_check']['max_abs_weight_diff_vs_train_qat']}")
    order = [k for k in CONFIGS if k in args.configs.split(",")]
    # every student is a fresh_copy (trainable) whatever a distilling Stepper did to the teacher before
    steppers = {k: Stepper(k, fresh_copy(model), io, train_config(n_params, args.warmup + args.repeats, args.batch,
                                                                  args.seq_len, **TRAIN_FIELDS[k]),
                           teacher=model if k in DISTILLING else None, target=target)
                for k in order}
    times = {k: [] for k in order}
    cpu = {k: [] for k in order}
    log(f"[{key}] {n_params / 1e6:.1f}M params, batch {args.batch}x{args.seq_len}: "
        f"{args.warmup} warm-up + {args.repeats} timed rounds of {' '.join(order)}")
    for r in range(args.warmup + args.repeats):
        line = []
        for k in order:
            gc.collect()
            sync()
            t, c = time.perf_counter(), time.process_time()
            steppers[k].step(ids)
            sync()
            dt, dc = time.perf_counter() - t, time.process_time() - c
            line.append(f"{k}={dt:.3f}s")
            if r >= args.warmup:
                times[k].append(dt)
                cpu[k].append(dc)
        log(f"[{key}]   round {r + 1}{' (warm-up)' if r < args.warmup else ''}: {' '.join(line)}")
    res["steps"] = {k: {"config": CONFIGS[k], **summarize(times[k], tokens),
                        "cpu_median_s": round(statistics.median(cpu[k]), 4),
                        "final_losses": {n: round(v, 5) for n, v in steppers[k].last_losses.items()}}
                    for k in order}
    res["ratios"] = {name: ratio(times[a], times[b]) for name, (a, b) in RATIOS.items() if a in times and b in times}
    res["ratios"].update({f"cpu_time_{name}": ratio(cpu[a], cpu[b]) for name, (a, b) in RATIOS.items()
                          if a in cpu and b in cpu})
    if "A_over_B" in res["ratios"]:
        res["meets_target_A_over_B_le_1.3"] = res["ratios"]["A_over_B"]["of_medians"] <= 1.3
    if "W_over_H" in res["ratios"]:
        res["meets_target_W_over_H_le_1"] = res["ratios"]["W_over_H"]["of_medians"] <= 1.0
    for s in steppers.values():
        s.close()
    del steppers, model
    gc.collect()
    return res


# ------------------------------------------------------------------ memory (one subprocess per configuration)

def child_main(args, json_out) -> int:
    """Set up ONE configuration, reset the RSS high-water mark, run a few steps, report it."""
    key, kind = args.model, args.config
    model, desc = load(key, args.full)
    model.to(DEVICE)
    n_params = sum(p.numel() for p in model.parameters())
    structure = discover(model, TernaryConfig().exclude)
    io = ModelIO.discover(model, structure)
    ids, target = make_batch(model, io, args.batch, args.seq_len)
    tcfg = train_config(n_params, args.mem_steps, args.batch, args.seq_len, **TRAIN_FIELDS[kind])
    if kind == "A":  # teacher + student, as in the pipeline
        stepper = Stepper("A", fresh_copy(model), io, tcfg, teacher=model)
    else:  # the one model being trained, nothing else (C: prepared in place, no float copy kept)
        stepper = Stepper(kind, model.requires_grad_(True), io, tcfg, target=target)
    del model
    gc.collect()
    hwm_load_kb = proc_status_kb("VmHWM")
    rss_setup_kb = proc_status_kb("VmRSS")
    reset = reset_hwm()
    if DEVICE.type == "cuda":
        sync()
        setup_gpu = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.mem_steps):
        t = time.perf_counter()
        stepper.step(ids)
        sync()
        times.append(round(time.perf_counter() - t, 4))
    hwm_steps_kb = proc_status_kb("VmHWM")
    gpu = {}
    if DEVICE.type == "cuda":
        gpu = {"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
               "gpu_after_setup_mb": round(setup_gpu / 2**20, 1)}
    out = {"model": key, "name": desc["name"], "config": kind, "steps": args.mem_steps,
           "peak_rss_mb": mb(hwm_steps_kb if reset else max(hwm_steps_kb, hwm_load_kb)),
           "peak_rss_during_steps_only": reset,
           "rss_after_setup_mb": mb(rss_setup_kb),
           "training_increment_mb": mb((hwm_steps_kb if reset else max(hwm_steps_kb, hwm_load_kb)) - rss_setup_kb),
           "peak_rss_incl_loading_mb": mb(max(hwm_load_kb, hwm_steps_kb)),
           "ru_maxrss_mb_unreliable": mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
           "step_times_s_not_interleaved": times, **gpu}
    json_out.write(json.dumps(out) + "\n")
    json_out.flush()
    return 0


def bench_memory(key: str, args) -> dict:
    res = {}
    for kind in ("A", "B", "C"):
        cmd = [sys.executable, os.path.abspath(__file__), "--config", kind, "--model", key,
               "--threads", str(args.threads), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
               "--mem-steps", str(args.mem_steps), "--device", str(DEVICE)]
        if args.full:
            cmd.append("--full")
        log(f"[{key}] memory: subprocess for config {kind}")
        t = time.perf_counter()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if p.returncode != 0:
            res[kind] = {"error": f"subprocess exited with {p.returncode}"}
            continue
        res[kind] = json.loads(p.stdout.strip().splitlines()[-1])
        res[kind]["subprocess_s"] = round(time.perf_counter() - t, 2)
        log(f"[{key}]   {kind}: peak {res[kind]['peak_rss_mb']} MB (after setup {res[kind]['rss_after_setup_mb']} MB)")
    if all("peak_rss_mb" in res.get(k, {}) for k in ("A", "B", "C")):
        res["peak_ratio_A_over_B"] = round(res["A"]["peak_rss_mb"] / res["B"]["peak_rss_mb"], 3)
        res["peak_ratio_C_over_B"] = round(res["C"]["peak_rss_mb"] / res["B"]["peak_rss_mb"], 3)
    if all("peak_gpu_mb" in res.get(k, {}) for k in ("A", "B", "C")):
        res["peak_gpu_ratio_A_over_B"] = round(res["A"]["peak_gpu_mb"] / res["B"]["peak_gpu_mb"], 3)
        res["peak_gpu_ratio_C_over_B"] = round(res["C"]["peak_gpu_mb"] / res["B"]["peak_gpu_mb"], 3)
    return res


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="LM = pretrained SmolLM2-135M instead of a random tiny LLaMA")
    ap.add_argument("--models", default="minilm,llama", help="comma list of: " + ", ".join(MODEL_KEYS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast, as train_qat on a GPU)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma list of: " + ", ".join(CONFIGS))
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds of every configuration")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds of every configuration")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads (0 = torch's default); 1 is steadier on an oversubscribed machine")
    ap.add_argument("--mem-steps", type=int, default=2, help="steps per memory subprocess")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory subprocesses")
    ap.add_argument("--no-check", action="store_true", help="skip the check of the A step against train_qat")
    ap.add_argument("--config", choices=sorted(CONFIGS), help=argparse.SUPPRESS)  # internal: memory child
    ap.add_argument("--model", choices=MODEL_KEYS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)

    # keep stdout for the one JSON object: anything else written to fd 1 goes to stderr
    json_out = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.config:
        return child_main(args, json_out)

    keys = [k.strip().lower() for k in args.models.split(",") if k.strip()]
    for k in keys:
        if k not in MODEL_KEYS:
            raise SystemExit(f"unknown model {k!r}; choose from {', '.join(MODEL_KEYS)}")
    t_all = time.perf_counter()
    torch.manual_seed(SEED)
    try:
        load_avg = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load_avg = None
    result = {
        "benchmark": "tritpress bench_qat",
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "mode": "full (SmolLM2-135M)" if args.full else "default (random tiny LLaMA; --full for SmolLM2-135M)",
        "configs": CONFIGS,
        "method": {"interleaving": "rounds of every configuration in one process; gc.collect() before each step, outside the timer",
                   "warmup_rounds": args.warmup, "timed_rounds": args.repeats,
                   "ratio_of_medians": "median(A)/median(B)",
                   "ratio_of_mins": "min(A)/min(B): least disturbed by other load on the machine",
                   "paired": "median/min/max over rounds of A_i/B_i (same round, same machine load)",
                   "cpu_time": "time.process_time() per step (all threads of this process): less sensitive than "
                               "wall time to being descheduled, but spin-waiting threads still count",
                   "mode": "eval() (dropout off) for all three, as train_qat runs its student",
                   "lambda": 1.0, "optimizer": "AdamW (train_qat's lr by model size, weight_decay 0), "
                   "grad clip 1.0, LambdaLR, zero_grad(set_to_none=True) in all three",
                   "memory": "VmHWM of a fresh subprocess per configuration, reset after setup"},
        "env": {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
                "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                "machine": platform.machine(), "load_avg_at_start": load_avg,
                "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE"), "device": str(DEVICE),
                "gpu": torch.cuda.get_device_name() if DEVICE.type == "cuda" else None},
        "models": {},
    }
    failures = []
    for key in keys:
        try:
            result["models"][key] = bench_timing(key, args)
            check = result["models"][key].get("replica_check")
            if check is not None and not check["ok"]:
                failures.append(f"{key}: A-step replica does not match train_qat")
        except Exception as e:
            log(traceback.format_exc())
            result["models"][key] = {"error": f"{type(e).__name__}: {e}"}
            failures.append(f"{key}: {type(e).__name__}: {e}")
        gc.collect()
    if not args.no_memory:
        for key in keys:
            if "error" in result["models"][key]:
                continue
            result["models"][key]["memory"] = mem = bench_memory(key, args)
            failures += [f"{key}/memory {k}: {v['error']}" for k, v in mem.items()
                         if isinstance(v, dict) and "error" in v]
    try:
        result["env"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    result["summary"] = {
        key: {"median_s": {k: v["median_s"] for k, v in m["steps"].items()},
              **{name: r["of_medians"] for name, r in m["ratios"].items() if not name.startswith("cpu_time")},
              **{k: v for k, v in m.items() if k.startswith("meets_target")},
              "tokens_per_s": {k: v["tokens_per_s"] for k, v in m["steps"].items()},
              "peak_rss_mb": {k: m.get("memory", {}).get(k, {}).get("peak_rss_mb") for k in ("A", "B", "C")},
              "peak_gpu_mb": {k: m.get("memory", {}).get(k, {}).get("peak_gpu_mb") for k in ("A", "B", "C")}}
        for key, m in result["models"].items() if "steps" in m}
    result["total_s"] = round(time.perf_counter() - t_all, 2)
    result["failures"] = failures
    json_out.write(json.dumps(result, indent=2) + "\n")
    json_out.flush()
    log(f"done in {result['total_s']} s; {'no failures' if not failures else f'{len(failures)} FAILURES'}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
