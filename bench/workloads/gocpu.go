// CPU-bound Go workload: a fixed number of SHA-256 rounds shared among 4 goroutines per
// GOMAXPROCS. More goroutines than Ps, so the runtime preempts them (SIGURG) all the time.
package main

import (
	"crypto/sha256"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync"
)

func main() {
	rounds, err := strconv.Atoi(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "usage: gocpu ROUNDS")
		os.Exit(2)
	}
	workers := 4 * runtime.GOMAXPROCS(0)
	results := make([]byte, workers)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			sum := [32]byte{byte(w)}
			for i := 0; i < rounds/workers; i++ {
				sum = sha256.Sum256(sum[:])
			}
			results[w] = sum[0]
		}(w)
	}
	wg.Wait()
	fmt.Printf("workers=%d digest=%x\n", workers, results)
}
