// Package natsconn connects a service to NATS the same way everywhere: named,
// reconnecting forever, with its connection events logged.
package natsconn

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/bulkhead-io/bulkhead/pkg/lifecycle"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Options say where and as whom to connect.
type Options struct {
	// URL is one or more comma-separated server URLs.
	URL string
	// Name identifies the connection in the server's monitoring.
	Name string
	// CredsFile is a NATS credentials file (deploy/ uses one per service).
	CredsFile string
	// User and Password authenticate when no credentials file is given.
	User, Password string
}

// Connect opens a connection and its JetStream context. The connection
// reconnects forever: a NATS restart is an outage to wait out, not a reason
// for a service to exit. When no server answers yet (a service started
// before NATS), Connect keeps trying until ctx ends; anything else (bad
// credentials, a bad URL) fails at once, so a misconfiguration is said, not
// waited on.
func Connect(ctx context.Context, o Options, log *slog.Logger) (*nats.Conn, jetstream.JetStream, error) {
	opts := []nats.Option{
		nats.Name(o.Name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
		nats.RetryOnFailedConnect(false),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			// A nil error is our own drain or close at shutdown.
			if err != nil {
				log.Warn("nats disconnected", "err", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) { log.Info("nats reconnected", "url", nc.ConnectedUrlRedacted()) }),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subj := ""
			if sub != nil {
				subj = sub.Subject
			}
			log.Warn("nats async error", "subject", subj, "err", err)
		}),
	}
	if o.CredsFile != "" {
		opts = append(opts, nats.UserCredentials(o.CredsFile))
	} else if o.User != "" {
		opts = append(opts, nats.UserInfo(o.User, o.Password))
	}
	var nc *nats.Conn
	var err error
	logged := time.Time{}
	for attempt := 0; ; attempt++ {
		nc, err = nats.Connect(o.URL, opts...)
		if err == nil {
			break
		}
		if !errors.Is(err, nats.ErrNoServers) {
			return nil, nil, fmt.Errorf("connect nats %s: %w", o.URL, err)
		}
		if time.Since(logged) > 5*time.Second {
			logged = time.Now()
			log.Warn("nats not answering yet; waiting", "url", o.URL, "err", err)
		}
		if !lifecycle.Sleep(ctx, lifecycle.Backoff(attempt, 100*time.Millisecond, 1600*time.Millisecond)) {
			return nil, nil, fmt.Errorf("connect nats %s: %w (last error: %v)", o.URL, ctx.Err(), err)
		}
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, fmt.Errorf("jetstream: %w", err)
	}
	return nc, js, nil
}
