from zerotunnel.cli.main import main

main()
