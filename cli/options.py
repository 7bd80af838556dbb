"""Options every `compress` sub-command shares."""
import typer

# read by cli.main.main before typer parses (it decides how errors are shown); declared on each
# command so that --help lists it and typer accepts it
DebugOpt = typer.Option(False, "--debug", help="Show full tracebacks on errors.")
