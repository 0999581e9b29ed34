from trainers.crossformer.train import main

main()
