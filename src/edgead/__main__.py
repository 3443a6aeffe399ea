from edgead.cli import main

main()
