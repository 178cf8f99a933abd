from vlcore.train.cli import train_cli

train_cli()
