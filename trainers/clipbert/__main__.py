from trainers.clipbert.train import main

main()
