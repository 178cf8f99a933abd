from vlcore.train.main import cli

cli()
