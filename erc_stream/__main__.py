from erc_stream.cli import main

main()
