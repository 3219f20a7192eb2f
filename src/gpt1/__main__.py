from gpt1.cli import run

run()
