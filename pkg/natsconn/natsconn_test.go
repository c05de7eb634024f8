package natsconn

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"go.uber.org/goleak"

	"github.com/bulkhead-io/bulkhead/pkg/natstest"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// logBuf is a goroutine-safe log sink.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func TestConnect(t *testing.T) {
	s := natstest.RunJetStream(t)
	logs := &logBuf{}
	nc, js, err := Connect(context.Background(), Options{URL: s.ClientURL(), Name: "bulkhead-test"}, slog.New(slog.NewTextHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	if !nc.IsConnected() {
		t.Fatal("not connected")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := js.AccountInfo(ctx); err != nil {
		t.Fatalf("JetStream not usable: %v", err)
	}
	// The name identifies the connection in the server's monitoring.
	conns, err := s.Connz(&server.ConnzOptions{})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, c := range conns.Conns {
		found = found || c.Name == "bulkhead-test"
	}
	if !found {
		t.Error("connection not named")
	}

	// A NATS outage is waited out, not fatal: the connection stays open
	// (reconnecting) and the disconnect is logged.
	s.Shutdown()
	poll.CheckFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		if !strings.Contains(logs.String(), "nats disconnected") {
			return errors.New("disconnect not logged")
		}
		return nil
	})
	if nc.IsClosed() {
		t.Error("connection closed on server outage; want reconnecting")
	}
}

func TestConnectUserPassword(t *testing.T) {
	s, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(),
		NoLog: true, NoSigs: true, Username: "svc", Password: "s3cret",
	})
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("server not ready")
	}
	log := slog.New(slog.DiscardHandler)
	for _, tc := range []struct {
		name, user, password string
		ok                   bool
	}{
		{"right", "svc", "s3cret", true},
		{"wrong password", "svc", "nope", false},
		{"none", "", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nc, _, err := Connect(context.Background(), Options{URL: s.ClientURL(), User: tc.user, Password: tc.password}, log)
			if tc.ok {
				if err != nil {
					t.Fatal(err)
				}
				nc.Close()
				return
			}
			if err == nil {
				nc.Close()
				t.Fatal("connected with bad credentials")
			}
			if !errors.Is(err, nats.ErrAuthorization) {
				t.Errorf("err = %v, want ErrAuthorization", err)
			}
		})
	}
}

func TestConnectErrors(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	for _, tc := range []struct {
		name, url string
		is        error
	}{
		{"nothing listening (waits until ctx ends)", "nats://127.0.0.1:1", context.DeadlineExceeded},
		{"bad url", "nats://[::1", nil},
		{"missing creds file", "", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := Options{URL: tc.url}
			if tc.name == "missing creds file" {
				o = Options{URL: "nats://127.0.0.1:1", CredsFile: t.TempDir() + "/none.creds"}
			}
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			nc, _, err := Connect(ctx, o, log)
			if err == nil {
				nc.Close()
				t.Fatal("Connect succeeded")
			}
			if !strings.HasPrefix(err.Error(), "connect nats "+o.URL+": ") {
				t.Errorf("err = %q, want it wrapped with the operation and URL", err)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("err = %v, want %v", err, tc.is)
			}
		})
	}
}

// TestConnectWaitsForNATS starts a service's connection before NATS: it
// must connect once the server comes up, not fail.
func TestConnectWaitsForNATS(t *testing.T) {
	port := natstest.FreePort(t)
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		nc, _, err := Connect(ctx, Options{URL: fmt.Sprintf("nats://127.0.0.1:%d", port)}, slog.New(slog.DiscardHandler))
		if err == nil {
			nc.Close()
		}
		done <- err
	}()
	time.Sleep(500 * time.Millisecond) // NATS comes up later: the fault under test
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: port, NoLog: true, NoSigs: true})
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	if err := <-done; err != nil {
		t.Fatalf("Connect before NATS was up: %v", err)
	}
}
