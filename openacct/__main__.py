from openacct.entry import main

main()
