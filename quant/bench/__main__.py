from quant.bench import main

main()
