from trainers.reserve.train import main

main()
