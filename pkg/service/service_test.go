package service

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/grpcserver"
	"github.com/bulkhead-io/bulkhead/pkg/natsconn"
	"github.com/bulkhead-io/bulkhead/pkg/natstest"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/telemetry"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/nats-io/nats-server/v2/server"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestRunReturnsFirstErrorAndCancelsTheRest(t *testing.T) {
	boom := errors.New("boom")
	stopped := make(chan error, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := RunAll(ctx,
		Component{Name: "waiter", Run: func(ctx context.Context) error {
			<-ctx.Done()
			stopped <- ctx.Err()
			return nil
		}},
		Component{Name: "failer", Run: func(context.Context) error { return boom }},
	)
	if !errors.Is(err, boom) {
		t.Fatalf("Run = %v, want boom", err)
	}
	if !strings.HasPrefix(err.Error(), "failer: ") {
		t.Errorf("Run = %q, want it prefixed with the component's name", err)
	}
	select {
	case cerr := <-stopped:
		if !errors.Is(cerr, context.Canceled) {
			t.Errorf("waiter saw %v, want Canceled", cerr)
		}
	default:
		t.Fatal("Run returned before the other component finished")
	}
}

func TestRunEndsCleanlyWithContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	finished := make(chan struct{}, 2)
	comp := func(name string) Component {
		return Component{Name: name, Run: func(ctx context.Context) error {
			<-ctx.Done()
			finished <- struct{}{}
			return nil
		}}
	}
	errc := make(chan error, 1)
	go func() { errc <- RunAll(ctx, comp("a"), comp("b")) }()
	cancel()
	select {
	case err := <-errc:
		if err != nil {
			t.Fatalf("Run = %v, want nil on shutdown", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
	if len(finished) != 2 {
		t.Errorf("%d components finished, want 2", len(finished))
	}
}

// blocking is an IngestService whose Submit waits for release.
type blocking struct {
	ingestv1.UnimplementedIngestServiceServer
	entered chan struct{}
	release chan struct{}
}

func (b *blocking) Submit(ctx context.Context, req *ingestv1.SubmitRequest) (*ingestv1.SubmitResponse, error) {
	b.entered <- struct{}{}
	select {
	case <-b.release:
		return &ingestv1.SubmitResponse{Accepted: int32(len(req.GetImpressions()))}, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

type grpcFixture struct {
	svc    *blocking
	client ingestv1.IngestServiceClient
	cancel context.CancelFunc
	errc   chan error
}

func startGRPC(t *testing.T, timeout time.Duration) *grpcFixture {
	t.Helper()
	gs, err := grpcserver.New(grpcserver.Options{})
	if err != nil {
		t.Fatal(err)
	}
	f := &grpcFixture{svc: &blocking{entered: make(chan struct{}, 1), release: make(chan struct{})}, errc: make(chan error, 1)}
	ingestv1.RegisterIngestServiceServer(gs.Server, f.svc)
	gs.Ready()
	lis := bufconn.Listen(1 << 20)
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	f.client = ingestv1.NewIngestServiceClient(conn)
	var ctx context.Context
	ctx, f.cancel = context.WithCancel(context.Background())
	go func() { f.errc <- RunAll(ctx, GRPC(gs, lis, timeout)) }()
	t.Cleanup(func() {
		f.cancel()
		<-f.errc
	})
	return f
}

func (f *grpcFixture) submit() chan error {
	res := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_, err := f.client.Submit(ctx, &ingestv1.SubmitRequest{Impressions: []*ingestv1.Impression{{Key: "u", Split: "s", Treatment: "on", Time: 1}}})
		res <- err
	}()
	return res
}

func TestGRPCFinishesCallsInFlight(t *testing.T) {
	f := startGRPC(t, 20*time.Second)
	res := f.submit()
	<-f.svc.entered
	f.cancel()
	// The graceful stop waits for the call in flight.
	select {
	case err := <-f.errc:
		t.Fatalf("Run returned (%v) with a call in flight", err)
	case <-time.After(300 * time.Millisecond): // observation window, not a synchronisation
	}
	close(f.svc.release)
	if err := <-res; err != nil {
		t.Fatalf("call in flight at shutdown failed: %v", err)
	}
	select {
	case err := <-f.errc:
		if err != nil {
			t.Fatalf("Run = %v, want nil", err)
		}
		f.errc <- nil // for the cleanup
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return once the call finished")
	}
}

func TestGRPCForcesStopAfterTimeout(t *testing.T) {
	f := startGRPC(t, 300*time.Millisecond)
	t.Cleanup(func() { close(f.svc.release) })
	res := f.submit()
	<-f.svc.entered
	start := time.Now()
	f.cancel()
	select {
	case err := <-f.errc:
		if err != nil {
			t.Fatalf("Run = %v", err)
		}
		f.errc <- nil
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after its shutdown timeout")
	}
	if el := time.Since(start); el < 250*time.Millisecond {
		t.Errorf("stopped after %v, before the 300ms grace", el)
	}
	if err := <-res; status.Code(err) == codes.OK {
		t.Error("call cut by a forced stop reported success")
	}
}

func TestGRPCServeErrorEndsRun(t *testing.T) {
	gs, err := grpcserver.New(grpcserver.Options{})
	if err != nil {
		t.Fatal(err)
	}
	lis := bufconn.Listen(1 << 10)
	_ = lis.Close()
	other := make(chan struct{})
	err = RunAll(context.Background(), GRPC(gs, lis, time.Second), Component{Name: "other", Run: func(ctx context.Context) error {
		<-ctx.Done()
		close(other)
		return nil
	}})
	if err == nil || !strings.HasPrefix(err.Error(), "grpc ") {
		t.Fatalf("Run = %v, want the grpc component's error", err)
	}
	<-other
}

func TestMetricsComponent(t *testing.T) {
	lis, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		errc <- RunAll(ctx, Metrics(telemetry.NewMetricsServer(lis, telemetry.NewRegistry()), 5*time.Second))
	}()
	url := "http://" + lis.Addr().String()
	for _, path := range []string{"/healthz", "/metrics"} {
		resp, err := http.Get(url + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusOK || len(body) == 0 {
			t.Errorf("GET %s = %d %q", path, resp.StatusCode, body)
		}
	}
	http.DefaultClient.CloseIdleConnections()
	cancel()
	if err := <-errc; err != nil {
		t.Fatalf("Run = %v", err)
	}
	if _, err := http.Get(url + "/healthz"); err == nil {
		t.Error("metrics server still serving after shutdown")
	}
	http.DefaultClient.CloseIdleConnections()
}

func TestListen(t *testing.T) {
	if lis, err := Listen(""); lis != nil || err != nil {
		t.Errorf("Listen(\"\") = %v, %v; want nil, nil", lis, err)
	}
	if _, err := Listen("256.0.0.1:0"); err == nil || !strings.HasPrefix(err.Error(), "listen 256.0.0.1:0: ") {
		t.Errorf("Listen(bad) = %v", err)
	}
}

func TestBaseValidate(t *testing.T) {
	good := func() Base {
		return Base{NATS: natsconn.Options{URL: "nats://127.0.0.1:4222"}, LogLevel: "info", ShutdownTimeout: time.Second}
	}
	for _, tc := range []struct {
		name   string
		mutate func(*Base)
		errHas string
	}{
		{"good", func(*Base) {}, ""},
		{"debug", func(b *Base) { b.LogLevel = "debug" }, ""},
		{"no url", func(b *Base) { b.NATS.URL = "" }, "nats-url"},
		{"bad level", func(b *Base) { b.LogLevel = "loud" }, "log-level"},
		{"zero timeout", func(b *Base) { b.ShutdownTimeout = 0 }, "shutdown-timeout"},
		{"negative timeout", func(b *Base) { b.ShutdownTimeout = -time.Second }, "shutdown-timeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := good()
			tc.mutate(&b)
			err := b.Validate()
			if tc.errHas == "" {
				if err != nil {
					t.Fatalf("Validate = %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.errHas) {
				t.Fatalf("Validate = %v, want an error about %s", err, tc.errHas)
			}
		})
	}
}

func TestRegisterFlagsDefaultsValidate(t *testing.T) {
	var b Base
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	b.RegisterFlags(fs, "monitor", "127.0.0.1:0")
	b.RegisterStreamFlags(fs)
	if err := fs.Parse([]string{"-impressions-max-bytes", "4096", "-nats-password", "hunter2"}); err != nil {
		t.Fatal(err)
	}
	if err := b.Validate(); err != nil {
		t.Fatalf("defaults do not validate: %v", err)
	}
	if b.NATS.Name != "bulkhead-monitor" || !b.OwnsStreams || b.Streams.ImpressionsMaxBytes != 4096 || b.Streams.Replicas != 1 {
		t.Errorf("flags gave %+v", b)
	}
	// A service that does not own the streams has no stream flags at all.
	var other Base
	ofs := flag.NewFlagSet("y", flag.ContinueOnError)
	ofs.SetOutput(io.Discard)
	other.RegisterFlags(ofs, "router", "127.0.0.1:0")
	if err := ofs.Parse([]string{"-export-window", "1h"}); err == nil || other.OwnsStreams {
		t.Errorf("a non-owner accepted -export-window (owns streams: %v)", other.OwnsStreams)
	}
	if s := b.LogValue().String(); strings.Contains(s, "hunter2") {
		t.Errorf("LogValue leaks the password: %s", s)
	}
}

func TestConnectEnsuresStreams(t *testing.T) {
	s := natstest.RunJetStream(t)
	b := Base{NATS: natsconn.Options{URL: s.ClientURL()}, LogLevel: "info", ShutdownTimeout: time.Second,
		OwnsStreams: true, Streams: stream.Limits{ImpressionsMaxBytes: 1 << 20}}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	log := slog.New(slog.DiscardHandler)
	nc, js, err := b.Connect(ctx, log)
	if err != nil {
		t.Fatal(err)
	}
	defer Drain(nc, 5*time.Second, log)
	st, err := js.Stream(ctx, topology.StreamImpressions)
	if err != nil {
		t.Fatalf("IMPRESSIONS not created: %v", err)
	}
	if got := st.CachedInfo().Config.MaxBytes; got != 1<<20 {
		t.Errorf("IMPRESSIONS MaxBytes = %d, want the configured 1 MiB", got)
	}
	if _, err := js.KeyValue(ctx, topology.BucketQuarantine); err != nil {
		t.Errorf("quarantine bucket not created: %v", err)
	}
}

func TestDrainClosesConnection(t *testing.T) {
	s := natstest.RunJetStream(t)
	nc, _ := natstest.Connect(t, s)
	sub, err := nc.SubscribeSync("x")
	if err != nil {
		t.Fatal(err)
	}
	Drain(nc, 5*time.Second, slog.New(slog.DiscardHandler))
	if !nc.IsClosed() {
		t.Error("connection open after Drain")
	}
	if sub.IsValid() {
		t.Error("subscription valid after Drain")
	}
}

// TestHealthFollowsNATS: a service's gRPC health is NOT_SERVING while its
// NATS connection is down and SERVING again once it is back.
func TestHealthFollowsNATS(t *testing.T) {
	port := natstest.FreePort(t)
	opts := &server.Options{Host: "127.0.0.1", Port: port, NoLog: true, NoSigs: true}
	startNATS := func() *server.Server {
		s, err := server.NewServer(opts.Clone())
		if err != nil {
			t.Fatal(err)
		}
		s.Start()
		if !s.ReadyForConnections(10 * time.Second) {
			t.Fatal("nats not ready")
		}
		return s
	}
	ns := startNATS()
	log := slog.New(slog.DiscardHandler)
	nc, _, err := natsconn.Connect(context.Background(), natsconn.Options{URL: ns.ClientURL()}, log)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	gs, err := grpcserver.New(grpcserver.Options{Log: log})
	if err != nil {
		t.Fatal(err)
	}
	gs.Ready()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- NATSHealth(nc, gs, log).Run(ctx) }()
	defer func() { cancel(); <-done }()
	status := func() healthpb.HealthCheckResponse_ServingStatus {
		r, err := gs.Health.Check(context.Background(), &healthpb.HealthCheckRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return r.GetStatus()
	}
	want := func(s healthpb.HealthCheckResponse_ServingStatus) {
		t.Helper()
		poll.CheckFor(t, 20*time.Second, 50*time.Millisecond, func() error {
			if got := status(); got != s {
				return fmt.Errorf("health %v, want %v", got, s)
			}
			return nil
		})
	}
	want(healthpb.HealthCheckResponse_SERVING)
	ns.Shutdown()
	ns.WaitForShutdown()
	want(healthpb.HealthCheckResponse_NOT_SERVING)
	ns = startNATS()
	defer func() { ns.Shutdown(); ns.WaitForShutdown() }()
	want(healthpb.HealthCheckResponse_SERVING)
}
