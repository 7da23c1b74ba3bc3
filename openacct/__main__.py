from openacct.cli import main

main()
