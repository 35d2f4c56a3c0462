from benchmarks.perf.run import main

main()
