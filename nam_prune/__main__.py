from nam_prune.cli import main

main()
