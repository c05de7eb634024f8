// Command monitor watches delivery outcomes, quarantines failing destinations,
// probes and releases them, and serves the operators' AdminService.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/bulkhead-io/bulkhead/pkg/obs"
	"github.com/bulkhead-io/bulkhead/services/monitor/monitor"
)

func main() {
	cfg, err := monitor.ParseConfig(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "monitor: config:", err)
		os.Exit(2)
	}
	log, err := obs.NewLogger(os.Stderr, cfg.LogLevel)
	if err != nil {
		fmt.Fprintln(os.Stderr, "monitor:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := monitor.Main(ctx, cfg, log); err != nil {
		log.Error("monitor stopped", "err", err)
		os.Exit(1)
	}
}
