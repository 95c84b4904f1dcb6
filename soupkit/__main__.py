from soupkit.cli.exit import run

run()
