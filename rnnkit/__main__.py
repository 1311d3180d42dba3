from rnnkit.cli import app

app(prog_name="rnnkit")
