from trainers.alpro.train import main

main()
