// Command bench is Bulkhead's noisy-neighbor benchmark (GitHub issue #4).
//
//	bench scenario    three systems fed one schedule: baseline (Bulkhead, no
//	                  failures), bulkhead (with the outage), shared-queue (the
//	                  incident's design, same outage); writes docs/bench/
//	bench throughput  highest sustained impressions/s with p99 < 2 s, and the
//	                  floor relay's, on the same machine in the same run
//	bench noisy       the noisy-neighbor matrix: quiet tenants beside one
//	                  noisy tenant per shape, one line per row; writes
//	                  docs/bench/noisy.md and noisy.json
//	bench demo        a 60-second run printing one status line per second
//
// Bulkhead runs as a separate process (the dev stack binary, built on the
// fly); the destinations, the load generator and the shared-queue model run
// in this process. Every size is a flag; see -h of each subcommand.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: bench scenario|throughput|noisy|demo [flags]")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "scenario":
		err = runScenario(ctx, log, os.Args[2:])
	case "throughput":
		err = runThroughput(ctx, log, os.Args[2:])
	case "demo":
		err = runDemo(ctx, log, os.Args[2:])
	case "noisy":
		err = runNoisy(ctx, log, os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q: want scenario, throughput, noisy or demo", os.Args[1])
	}
	if err == flag.ErrHelp {
		os.Exit(0)
	}
	if err != nil {
		log.Error("bench failed", "err", err)
		os.Exit(1)
	}
}
