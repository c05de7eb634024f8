package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"time"

	"github.com/bulkhead-io/bulkhead/e2e/internal/report"
	"github.com/bulkhead-io/bulkhead/e2e/internal/scenario"
)

// runDemo runs a 60-second Bulkhead-only scenario and prints one status
// line per second.
func runDemo(ctx context.Context, log *slog.Logger, args []string) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	def := scenario.Default()
	def.Warmup, def.Steady, def.Outage, def.Recovery, def.DrainMax = 5*time.Second, 10*time.Second, 30*time.Second, 15*time.Second, 30*time.Second
	var c common
	c.register(fs, def)
	if err := fs.Parse(args); err != nil {
		return err
	}
	bin, cleanup, err := c.prepare(ctx, log)
	if err != nil {
		return err
	}
	defer cleanup()
	fmt.Printf("demo: %d destinations, %.0f%% failing (%s) from %v to %v, %.0f impressions/s\n",
		c.cfg.Destinations, 100*c.cfg.FailingShare, c.mix, c.cfg.OnsetAt(), c.cfg.HealAt(), c.cfg.Rate)
	live := func(l scenario.Live) {
		fmt.Printf("t=%3.0fs %-8s healthy %6d/s p99 %7s | failing %6d/s p99 %7s | quarantined %3d | backlog %7d\n",
			l.Elapsed.Seconds(), l.Phase,
			l.Delivered[report.Healthy], fmtDur(l.P99[report.Healthy]),
			l.Delivered[report.Failing], fmtDur(l.P99[report.Failing]), l.Quarantined, l.Backlog)
	}
	r, err := runSystem(ctx, log, &c, bin, sysBulkhead, report.NewRecorder(0), live)
	if err != nil {
		return err
	}
	s := r.Outcome.Result
	fmt.Printf("demo: accepted %d delivered %d parked %d lost %d duplicates %d\n", s.Accepted, s.Delivered, s.Parked, s.Lost, s.Duplicates)
	return nil
}

func fmtDur(d time.Duration) string {
	if d == 0 {
		return "-"
	}
	if d < time.Second {
		return d.Round(time.Millisecond).String()
	}
	return d.Round(100 * time.Millisecond).String()
}
