// Command devstack runs the whole of Bulkhead on one machine: an embedded NATS
// server with JetStream (data kept under a local directory across restarts)
// and the four services, each with its own configuration, on sane defaults
// for local development. It is what `make run` starts.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/bulkhead-io/bulkhead/pkg/conf"
	"github.com/bulkhead-io/bulkhead/pkg/grpcserver"
	"github.com/bulkhead-io/bulkhead/pkg/service"
	"github.com/bulkhead-io/bulkhead/pkg/telemetry"
	"github.com/bulkhead-io/bulkhead/services/deliverer"
	"github.com/bulkhead-io/bulkhead/services/ingest"
	"github.com/bulkhead-io/bulkhead/services/monitor"
	"github.com/bulkhead-io/bulkhead/services/router"
)

// envPrefix prefixes the dev stack's own settings.
const envPrefix = "BULKHEAD_DEV"

func main() {
	fs := flag.NewFlagSet("devstack", flag.ContinueOnError)
	dataDir := fs.String("data-dir", "data", "where JetStream keeps its data (kept across restarts)")
	natsAddr := fs.String("nats-host", "127.0.0.1", "embedded NATS host")
	natsPort := fs.Int("nats-port", 4222, "embedded NATS port")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	if err := conf.Parse(fs, envPrefix, os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "devstack:", err)
		os.Exit(2)
	}
	log, err := telemetry.NewLogger(os.Stderr, *level)
	if err != nil {
		fmt.Fprintln(os.Stderr, "devstack:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, log, *dataDir, *natsAddr, *natsPort); err != nil {
		log.Error("devstack stopped", "err", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, log *slog.Logger, dataDir, host string, port int) error {
	// NATS.
	store, err := filepath.Abs(filepath.Join(dataDir, "jetstream"))
	if err != nil {
		return err
	}
	ns, err := server.NewServer(&server.Options{
		ServerName: "bulkhead-dev", Host: host, Port: port,
		JetStream: true, StoreDir: store, NoSigs: true,
	})
	if err != nil {
		return fmt.Errorf("nats server: %w", err)
	}
	ns.SetLoggerV2(natsLogger{log.With("service", "nats")}, false, false, false)
	ns.Start()
	defer func() {
		ns.Shutdown()
		ns.WaitForShutdown()
		log.Info("nats stopped")
	}()
	if !ns.ReadyForConnections(30 * time.Second) {
		return fmt.Errorf("nats not ready on %s:%d", host, port)
	}
	url := ns.ClientURL()
	log.Info("nats listening", "url", url, "store", store)

	// Services, each configured from its own BULKHEAD_<SVC>_* variables,
	// with development defaults where those are unset.
	ing, err := configure(ingest.Flags, ingest.EnvPrefix, url, map[string]string{"api-keys": "dev-key=demo"})
	if err != nil {
		return err
	}
	rtr, err := configure(router.Flags, router.EnvPrefix, url, nil)
	if err != nil {
		return err
	}
	dlv, err := configure(deliverer.Flags, deliverer.EnvPrefix, url, map[string]string{"allow-nets": "127.0.0.0/8,::1/128"})
	if err != nil {
		return err
	}
	mon, err := configure(monitor.Flags, monitor.EnvPrefix, url, map[string]string{
		"admin-tokens": "admin:dev-admin:operator,viewer:dev-viewer:read",
		"allow-nets":   "127.0.0.0/8,::1/128",
	})
	if err != nil {
		return err
	}
	for _, v := range []interface{ Validate() error }{ing, rtr, dlv, mon} {
		if err := v.Validate(); err != nil {
			return err
		}
	}
	err = service.RunAll(ctx,
		service.Component{Name: "monitor", Run: func(ctx context.Context) error { return monitor.Serve(ctx, mon, log.With("service", "monitor")) }},
		service.Component{Name: "router", Run: func(ctx context.Context) error { return router.Serve(ctx, rtr, log.With("service", "router")) }},
		service.Component{Name: "deliverer", Run: func(ctx context.Context) error {
			return deliverer.Serve(ctx, dlv, log.With("service", "deliverer"))
		}},
		service.Component{Name: "ingest", Run: func(ctx context.Context) error { return ingest.Serve(ctx, ing, log.With("service", "ingest")) }},
		service.Component{Name: "banner", Run: func(ctx context.Context) error {
			if err := waitServing(ctx, ing.GRPCAddr, mon.AdminAddr); err != nil {
				return nil // shutting down before the services came up
			}
			log.Info("bulkhead is up", append([]any{"ingest_grpc", ing.GRPCAddr, "admin_grpc", mon.AdminAddr, "nats", url},
				credentials(os.LookupEnv)...)...)
			<-ctx.Done()
			return nil
		}},
	)
	log.Info("services stopped")
	return err
}

// configure builds a service's configuration from its flags, its environment
// variables and the dev stack's defaults (which apply only where no variable
// is set), pointed at the embedded NATS server.
func configure[C any](flags func(*flag.FlagSet) *C, prefix, natsURL string, defaults map[string]string) (*C, error) {
	fs := flag.NewFlagSet(prefix, flag.ContinueOnError)
	c := flags(fs)
	if defaults == nil {
		defaults = map[string]string{}
	}
	defaults["nats-url"] = natsURL
	for name, v := range defaults {
		if _, set := os.LookupEnv(conf.EnvName(prefix, name)); !set {
			if err := fs.Set(name, v); err != nil {
				return nil, fmt.Errorf("%s %s: %w", prefix, name, err)
			}
		}
	}
	if err := conf.Parse(fs, prefix, nil); err != nil {
		return nil, err
	}
	return c, nil
}

// waitServing waits until every address answers SERVING, so the banner
// appears only when the stack can be used.
func waitServing(ctx context.Context, addrs ...string) error {
	for _, addr := range addrs {
		if err := grpcserver.WaitServing(ctx, addr); err != nil {
			return err
		}
	}
	return nil
}

// natsLogger sends the embedded server's notices and errors to slog.
type natsLogger struct{ log *slog.Logger }

func (l natsLogger) Noticef(format string, v ...any) { l.log.Debug(fmt.Sprintf(format, v...)) }
func (l natsLogger) Warnf(format string, v ...any)   { l.log.Warn(fmt.Sprintf(format, v...)) }
func (l natsLogger) Fatalf(format string, v ...any)  { l.log.Error(fmt.Sprintf(format, v...)) }
func (l natsLogger) Errorf(format string, v ...any)  { l.log.Error(fmt.Sprintf(format, v...)) }
func (l natsLogger) Debugf(format string, v ...any)  { l.log.Debug(fmt.Sprintf(format, v...)) }
func (l natsLogger) Tracef(format string, v ...any)  { l.log.Debug(fmt.Sprintf(format, v...)) }

// credentials says which API keys and admin tokens are in force for the
// banner: the development ones by name when they are (they are public), and
// never the value of a key or token an operator configured.
func credentials(lookup func(string) (string, bool)) []any {
	apiKey := "dev-key (tenant demo)"
	if _, set := lookup(conf.EnvName(ingest.EnvPrefix, "api-keys")); set {
		apiKey = "as configured in " + conf.EnvName(ingest.EnvPrefix, "api-keys")
	}
	adminToken := "dev-admin (operator), dev-viewer (read)"
	if _, set := lookup(conf.EnvName(monitor.EnvPrefix, "admin-tokens")); set {
		adminToken = "as configured in " + conf.EnvName(monitor.EnvPrefix, "admin-tokens")
	}
	return []any{"api_key", apiKey, "admin_token", adminToken}
}
