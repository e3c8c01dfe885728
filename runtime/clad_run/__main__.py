from clad_run.cli import main

main()
