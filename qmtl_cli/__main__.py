from qmtl_cli.app import main

main()
