from benchmarks.ruler.run import main

main()
