// Command ingest serves bulkhead.ingest.v1.IngestService: it authenticates
// callers and stores their impressions in JetStream.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/bulkhead-io/bulkhead/pkg/obs"
	"github.com/bulkhead-io/bulkhead/services/ingest/ingest"
)

func main() {
	cfg, err := ingest.ParseConfig(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "ingest: config:", err)
		os.Exit(2)
	}
	log, err := obs.NewLogger(os.Stderr, cfg.LogLevel)
	if err != nil {
		fmt.Fprintln(os.Stderr, "ingest:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := ingest.Main(ctx, cfg, log); err != nil {
		log.Error("ingest stopped", "err", err)
		os.Exit(1)
	}
}
