// Command router fans accepted impressions out to per-destination subjects,
// parks the traffic of quarantined destinations and replays it on recovery.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/bulkhead-io/bulkhead/pkg/obs"
	"github.com/bulkhead-io/bulkhead/services/router/router"
)

func main() {
	cfg, err := router.ParseConfig(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "router: config:", err)
		os.Exit(2)
	}
	log, err := obs.NewLogger(os.Stderr, cfg.LogLevel)
	if err != nil {
		fmt.Fprintln(os.Stderr, "router:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := router.Main(ctx, cfg, log); err != nil {
		log.Error("router stopped", "err", err)
		os.Exit(1)
	}
}
