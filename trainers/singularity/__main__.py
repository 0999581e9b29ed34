from trainers.singularity.train import main

main()
