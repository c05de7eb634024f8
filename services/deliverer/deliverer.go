// Package deliverer wires the deliverer service: per-destination consumers,
// the fair worker pool and the webhook client. main and the dev stack start
// it with Serve (listening where it is configured to); tests and the e2e
// stack with Run (on listeners they opened).
package deliverer

import (
	"context"
	"errors"
	"flag"
	"log/slog"
	"net"
	"time"

	"github.com/bulkhead-io/bulkhead/pkg/conf"
	"github.com/bulkhead-io/bulkhead/pkg/netguard"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/service"
	"github.com/bulkhead-io/bulkhead/pkg/telemetry"
	"github.com/bulkhead-io/bulkhead/pkg/webhook"
	"github.com/bulkhead-io/bulkhead/services/deliverer/internal/deliver"
	"github.com/bulkhead-io/bulkhead/services/deliverer/internal/retry"
	"github.com/bulkhead-io/bulkhead/services/deliverer/internal/schedule"
)

// EnvPrefix prefixes the environment variables of this service.
const EnvPrefix = "BULKHEAD_DELIVERER"

// Config is the deliverer's configuration.
type Config struct {
	service.Base
	Deliver deliver.Config
	// AllowNets are CIDRs that destinations may resolve to although private
	// (e.g. 127.0.0.0/8 for local development).
	AllowNets      conf.StringList
	ConnectTimeout time.Duration
}

// Flags registers the configuration's flags on fs and returns it with defaults.
func Flags(fs *flag.FlagSet) *Config {
	c := &Config{}
	c.Base.RegisterFlags(fs, "deliverer", "127.0.0.1:7412")
	d := &c.Deliver
	d.Schedule = schedule.DefaultConfig()
	d.Retry = retry.DefaultPolicy()
	// Workers are goroutines waiting on sockets, cheap; what matters is that
	// failing destinations × their in-flight cap stays well below the pool.
	fs.IntVar(&d.Workers, "workers", 512, "shared pool of POSTing workers")
	fs.IntVar(&d.Schedule.MaxCap, "max-inflight-per-destination", d.Schedule.MaxCap, "ceiling of the adaptive per-destination in-flight cap")
	fs.IntVar(&d.Schedule.InitialCap, "initial-inflight-per-destination", d.Schedule.InitialCap, "in-flight cap of a new destination")
	fs.IntVar(&d.Schedule.MaxQueued, "max-queued-per-destination", d.Schedule.MaxQueued, "ready batches one destination may queue before its consumer pauses")
	fs.IntVar(&d.Schedule.Quantum, "quantum", d.Schedule.Quantum, "fair-share quantum in impressions (deficit round robin)")
	fs.IntVar(&d.Schedule.TenantMaxInFlight, "tenant-max-inflight", 0, "workers one tenant's destinations may hold together (0: a quarter of -workers, at least two destination caps)")
	fs.DurationVar(&d.Schedule.TimeQuantum, "time-quantum", d.Schedule.TimeQuantum, "worker time charged as one quantum of impressions in the fair share")
	fs.DurationVar(&d.Schedule.HangAfter, "hang-after", d.Schedule.HangAfter, "cut a destination to one request in flight once a request has waited this long and 4 times its usual latency")
	fs.DurationVar(&d.Retry.Base, "retry-base", d.Retry.Base, "first retry backoff (doubles per attempt, with jitter)")
	fs.DurationVar(&d.Retry.Max, "retry-max", d.Retry.Max, "backoff ceiling")
	fs.IntVar(&d.Retry.MaxAttempts, "retry-attempts", d.Retry.MaxAttempts, "attempts before a batch is parked")
	fs.DurationVar(&d.Retry.MaxAge, "retry-max-age", d.Retry.MaxAge, "age after which a failing batch is parked")
	fs.Float64Var(&d.RetryShare, "retry-share", 0.5, "share of the workers retries may occupy at once (the rest is kept for fresh traffic)")
	fs.Float64Var(&d.ReplayShare, "replay-share", deliver.DefaultReplayShare, "share of the workers replayed batches (recovering backlogs) may occupy at once")
	// Short, with progress acks every third of it: a batch delivered to a
	// deliverer that died, or lost in transit when a NATS node stalled, is
	// redelivered after this, and nothing waits longer.
	fs.DurationVar(&d.AckWait, "ack-wait", 15*time.Second, "redelivery timeout of per-destination consumers (held messages get progress acks every third of it)")
	fs.IntVar(&d.MaxAckPending, "max-ack-pending", 2000, "messages one destination may hold unacknowledged")
	fs.IntVar(&d.LaneMaxBytes, "lane-max-bytes", deliver.DefaultLaneMaxBytes, "bytes of messages one destination may hold in memory (pulled, not yet acknowledged); the rest waits in DELIVERY")
	fs.DurationVar(&c.ConnectTimeout, "connect-timeout", 3*time.Second, "bound on one TCP connect or TLS handshake")
	fs.Var(&c.AllowNets, "allow-nets", "CIDRs destinations may use although private, comma-separated (e.g. 127.0.0.0/8)")
	return c
}

// ParseConfig reads flags and BULKHEAD_DELIVERER_* variables, then validates.
func ParseConfig(args []string) (*Config, error) {
	return service.Parse("deliverer", EnvPrefix, Flags, args)
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	if err := c.Base.Validate(); err != nil {
		return err
	}
	d := c.Deliver
	if d.Workers < 1 || d.Workers > 4096 {
		return errors.New("workers: want 1 to 4096")
	}
	if err := d.Schedule.Validate(); err != nil {
		return err
	}
	if err := d.Retry.Validate(); err != nil {
		return err
	}
	if c.ConnectTimeout <= 0 {
		return errors.New("connect-timeout must be positive")
	}
	if d.RetryShare <= 0 || d.RetryShare > 1 || d.ReplayShare <= 0 || d.ReplayShare > 1 {
		return errors.New("retry-share and replay-share: want more than 0 and at most 1")
	}
	if d.AckWait < 3*time.Second {
		return errors.New("ack-wait: want at least 3s")
	}
	if d.MaxAckPending < 1 {
		return errors.New("max-ack-pending: want at least 1")
	}
	_, err := netguard.NewPolicy(c.AllowNets)
	return err
}

// Serve opens the configured metrics listener and runs until ctx ends.
func Serve(ctx context.Context, c *Config, log *slog.Logger) error {
	m, err := service.Listen(c.MetricsAddr)
	if err != nil {
		return err
	}
	return Run(ctx, c, log, m)
}

// Run delivers until ctx ends, then finishes the POSTs in flight, hands every
// other message back to JetStream and drains NATS. metrics may be nil.
func Run(ctx context.Context, c *Config, log *slog.Logger, metrics net.Listener) error {
	log.Info("starting deliverer", "config", c.Base, "workers", c.Deliver.Workers, "allow_nets", c.AllowNets)
	policy, err := netguard.NewPolicy(c.AllowNets)
	if err != nil {
		return err
	}

	// Dependencies.
	nc, js, err := c.Base.Connect(ctx, log)
	if err != nil {
		return err
	}
	defer service.Drain(nc, c.ShutdownTimeout, log)
	reg := telemetry.NewRegistry()
	client := webhook.NewClient(policy, webhook.ClientOptions{
		ConnectTimeout: c.ConnectTimeout, TLSHandshakeTimeout: c.ConnectTimeout,
	})
	defer client.CloseIdleConnections()
	dests, err := registry.OpenMeasured(ctx, js, log, reg)
	if err != nil {
		return err
	}
	defer dests.Stop()
	d, err := deliver.New(js, dests, client, c.Deliver, log, reg)
	if err != nil {
		return err
	}

	// Components.
	comps := []service.Component{{Name: "deliver", Run: d.Run}}
	if metrics != nil {
		comps = append(comps, service.Metrics(telemetry.NewMetricsServer(metrics, reg), c.ShutdownTimeout))
		log.Info("deliverer metrics", "addr", metrics.Addr().String())
	}
	log.Info("deliverer running", "destinations", len(dests.Destinations()))
	return service.RunAll(ctx, comps...)
}
