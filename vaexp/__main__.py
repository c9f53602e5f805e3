from vaexp.cli import main

main()
