from precondtune.cli import main

main()
