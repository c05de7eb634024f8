// Command deliverer POSTs routed impressions to webhook destinations: batched,
// signed, retried without holding a worker, and parked when undeliverable.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/bulkhead-io/bulkhead/pkg/obs"
	"github.com/bulkhead-io/bulkhead/services/deliverer/deliverer"
)

func main() {
	cfg, err := deliverer.ParseConfig(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "deliverer: config:", err)
		os.Exit(2)
	}
	log, err := obs.NewLogger(os.Stderr, cfg.LogLevel)
	if err != nil {
		fmt.Fprintln(os.Stderr, "deliverer:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := deliverer.Main(ctx, cfg, log); err != nil {
		log.Error("deliverer stopped", "err", err)
		os.Exit(1)
	}
}
