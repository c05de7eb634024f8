// Package router wires the router service: it fans accepted impressions out
// to destinations, enforces quarantine by parking, and replays parked
// backlogs on recovery. main and the dev stack start it with Serve
// (listening where it is configured to); tests and the e2e stack with Run
// (on listeners they opened).
package router

import (
	"context"
	"errors"
	"flag"
	"log/slog"
	"net"
	"time"

	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/service"
	"github.com/bulkhead-io/bulkhead/pkg/telemetry"
	"github.com/bulkhead-io/bulkhead/services/router/internal/fanout"
	"github.com/bulkhead-io/bulkhead/services/router/internal/replay"
)

// EnvPrefix prefixes the environment variables of this service.
const EnvPrefix = "BULKHEAD_ROUTER"

// Config is the router's configuration.
type Config struct {
	service.Base
	Fanout fanout.Config
	Replay replay.Config
}

// Flags registers the configuration's flags on fs and returns it with defaults.
func Flags(fs *flag.FlagSet) *Config {
	c := &Config{}
	c.Base.RegisterFlags(fs, "router", "127.0.0.1:7411")
	fs.IntVar(&c.Fanout.Workers, "workers", 32, "batches routed concurrently")
	fs.DurationVar(&c.Fanout.AckWait, "ack-wait", 15*time.Second, "redelivery timeout of an unacknowledged batch (above publish-timeout)")
	fs.IntVar(&c.Fanout.MaxAckPending, "max-ack-pending", 4096, "batches in flight across all router replicas")
	fs.DurationVar(&c.Fanout.PublishTimeout, "publish-timeout", 10*time.Second, "bound on storing a batch's outputs")
	fs.Float64Var(&c.Replay.Rate, "replay-rate", 50, "starting replay rate, batches per second")
	fs.Float64Var(&c.Replay.MaxRate, "replay-max-rate", 2000, "replay rate ceiling, batches per second")
	fs.DurationVar(&c.Replay.RampEvery, "replay-ramp", time.Second, "the replay rate doubles at this interval")
	fs.Float64Var(&c.Replay.TotalRate, "replay-total-rate", 1000, "cap on all replays of this replica together, batches per second")
	fs.StringVar(&c.Replay.Holder, "replica-id", service.ReplicaID(), "this replica's name in replay leases")
	return c
}

// ParseConfig reads flags and BULKHEAD_ROUTER_* variables, then validates.
func ParseConfig(args []string) (*Config, error) {
	return service.Parse("router", EnvPrefix, Flags, args)
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	if err := c.Base.Validate(); err != nil {
		return err
	}
	switch {
	case c.Fanout.Workers < 1 || c.Fanout.Workers > 1024:
		return errors.New("workers: want 1 to 1024")
	case c.Fanout.AckWait < time.Second:
		return errors.New("ack-wait: want at least 1s")
	case c.Fanout.MaxAckPending < c.Fanout.Workers:
		return errors.New("max-ack-pending must be at least workers")
	case c.Fanout.PublishTimeout <= 0 || c.Fanout.PublishTimeout >= c.Fanout.AckWait:
		return errors.New("publish-timeout: want positive and below ack-wait")
	case c.Replay.Rate <= 0 || c.Replay.MaxRate < c.Replay.Rate:
		return errors.New("replay-rate must be positive and at most replay-max-rate")
	case c.Replay.TotalRate < c.Replay.Rate:
		return errors.New("replay-total-rate must be at least replay-rate")
	case c.Replay.Holder == "":
		return errors.New("replica-id is required")
	}
	return nil
}

// Serve opens the configured metrics listener and runs until ctx ends.
func Serve(ctx context.Context, c *Config, log *slog.Logger) error {
	m, err := service.Listen(c.MetricsAddr)
	if err != nil {
		return err
	}
	return Run(ctx, c, log, m)
}

// Run runs the router until ctx ends, then finishes the batches in flight and
// drains NATS. metrics may be nil.
func Run(ctx context.Context, c *Config, log *slog.Logger, metrics net.Listener) error {
	log.Info("starting router", "config", c.Base, "workers", c.Fanout.Workers, "replica", c.Replay.Holder)

	// Dependencies.
	nc, js, err := c.Base.Connect(ctx, log)
	if err != nil {
		return err
	}
	defer service.Drain(nc, c.ShutdownTimeout, log)
	reg := telemetry.NewRegistry()
	// The view outlives ctx until Run returns: batches still being routed
	// during shutdown need a current view too.
	dests, err := registry.OpenMeasured(ctx, js, log, reg)
	if err != nil {
		return err
	}
	defer dests.Stop()
	rep, err := replay.New(ctx, js, dests, c.Replay, log, reg)
	if err != nil {
		return err
	}
	fcfg := c.Fanout
	fcfg.OverBudget = rep.Overflowed
	fo, err := fanout.New(js, dests, fcfg, log, reg)
	if err != nil {
		return err
	}

	// Components.
	comps := []service.Component{
		{Name: "fanout", Run: fo.Run},
		{Name: "replay", Run: rep.Run},
	}
	if metrics != nil {
		comps = append(comps, service.Metrics(telemetry.NewMetricsServer(metrics, reg), c.ShutdownTimeout))
		log.Info("router metrics", "addr", metrics.Addr().String())
	}
	log.Info("router running", "destinations", len(dests.Destinations()))
	return service.RunAll(ctx, comps...)
}
