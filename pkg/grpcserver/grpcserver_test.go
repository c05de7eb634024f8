package grpcserver_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/grpcserver"
	"github.com/bulkhead-io/bulkhead/pkg/grpctest"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type callerKey struct{}

// ingest is a tiny IngestService: Submit echoes the caller the auth function
// put in the context as the batch id, and panics for the idempotency key
// "panic"; SubmitStream answers each batch.
type ingest struct {
	ingestv1.UnimplementedIngestServiceServer
	calls atomic.Int32
}

func (s *ingest) Submit(ctx context.Context, req *ingestv1.SubmitRequest) (*ingestv1.SubmitResponse, error) {
	s.calls.Add(1)
	if req.GetIdempotencyKey() == "panic" {
		panic("handler bug")
	}
	caller, _ := ctx.Value(callerKey{}).(string)
	return &ingestv1.SubmitResponse{BatchId: caller, Accepted: int32(len(req.GetImpressions()))}, nil
}

func (s *ingest) SubmitStream(srv grpc.BidiStreamingServer[ingestv1.SubmitStreamRequest, ingestv1.SubmitStreamResponse]) error {
	s.calls.Add(1)
	for {
		req, err := srv.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := srv.Send(&ingestv1.SubmitStreamResponse{Sequence: req.GetSequence()}); err != nil {
			return err
		}
	}
}

const goodToken = "good-token"

func auth(ctx context.Context, _ string, token string) (context.Context, error) {
	if token != goodToken {
		return nil, status.Error(codes.Unauthenticated, "bad token")
	}
	return context.WithValue(ctx, callerKey{}, "caller-1"), nil
}

func start(t *testing.T, reg prometheus.Registerer) (*ingest, ingestv1.IngestServiceClient, *grpc.ClientConn) {
	t.Helper()
	svc := &ingest{}
	conn := grpctest.Start(t, grpcserver.Options{Auth: auth, Registry: reg}, func(s *grpc.Server) {
		ingestv1.RegisterIngestServiceServer(s, svc)
	})
	return svc, ingestv1.NewIngestServiceClient(conn), conn
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func valid() *ingestv1.SubmitRequest {
	return &ingestv1.SubmitRequest{Impressions: []*ingestv1.Impression{{Key: "u", Split: "s", Treatment: "on", Time: 1}}}
}

func TestAuth(t *testing.T) {
	svc, client, _ := start(t, nil)
	ctx := ctxT(t)
	for _, tc := range []struct {
		name string
		ctx  context.Context
		code codes.Code
	}{
		{"no token", ctx, codes.Unauthenticated},
		{"wrong token", grpctest.WithToken(ctx, "wrong"), codes.Unauthenticated},
		{"good token", grpctest.WithToken(ctx, goodToken), codes.OK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := svc.calls.Load()
			resp, err := client.Submit(tc.ctx, valid())
			if got := status.Code(err); got != tc.code {
				t.Fatalf("Submit: %v, want %v", err, tc.code)
			}
			if tc.code != codes.OK {
				if svc.calls.Load() != before {
					t.Error("handler ran for an unauthenticated call")
				}
				return
			}
			// The handler runs with the context the auth function returned.
			if resp.GetBatchId() != "caller-1" {
				t.Errorf("handler saw caller %q, want caller-1", resp.GetBatchId())
			}
		})
	}

	t.Run("streams too", func(t *testing.T) {
		st, err := client.SubmitStream(ctx)
		if err != nil {
			t.Fatal(err)
		}
		_, err = st.Recv()
		if status.Code(err) != codes.Unauthenticated {
			t.Errorf("SubmitStream without a token: %v, want Unauthenticated", err)
		}
	})
}

func TestHealthNeedsNoToken(t *testing.T) {
	_, _, conn := start(t, nil)
	h := healthpb.NewHealthClient(conn)
	for _, svc := range []string{"", ingestv1.IngestService_ServiceDesc.ServiceName} {
		resp, err := h.Check(ctxT(t), &healthpb.HealthCheckRequest{Service: svc})
		if err != nil {
			t.Fatalf("Check(%q) without a token: %v", svc, err)
		}
		if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("Check(%q) = %v, want SERVING after Ready", svc, resp.GetStatus())
		}
	}
}

func TestPublic(t *testing.T) {
	for _, tc := range []struct {
		method string
		public bool
	}{
		{"/grpc.health.v1.Health/Check", true},
		{"/grpc.health.v1.Health/Watch", true},
		{"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", true},
		{"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", true},
		{"/bulkhead.ingest.v1.IngestService/Submit", false},
		{"/bulkhead.admin.v1.AdminService/PauseDestination", false},
		{"/evil.grpc.health.v1.Health/Check", false},
	} {
		t.Run(tc.method, func(t *testing.T) {
			if got := grpcserver.Public(tc.method); got != tc.public {
				t.Errorf("Public = %v, want %v", got, tc.public)
			}
		})
	}
}

func TestValidation(t *testing.T) {
	svc, client, _ := start(t, nil)
	ctx := grpctest.WithToken(ctxT(t), goodToken)
	for _, tc := range []struct {
		name string
		req  *ingestv1.SubmitRequest
	}{
		{"no impressions", &ingestv1.SubmitRequest{}},
		{"impression without key", &ingestv1.SubmitRequest{Impressions: []*ingestv1.Impression{{Split: "s", Treatment: "on", Time: 1}}}},
		{"bad idempotency key", &ingestv1.SubmitRequest{Impressions: valid().Impressions, IdempotencyKey: "a b"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := svc.calls.Load()
			_, err := client.Submit(ctx, tc.req)
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("Submit: %v, want InvalidArgument", err)
			}
			if svc.calls.Load() != before {
				t.Error("handler ran for an invalid request")
			}
		})
	}

	t.Run("stream messages", func(t *testing.T) {
		st, err := client.SubmitStream(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Send(&ingestv1.SubmitStreamRequest{Sequence: 1}); err != nil {
			t.Fatal(err)
		}
		if _, err := st.Recv(); status.Code(err) != codes.InvalidArgument {
			t.Errorf("stream message without batch: %v, want InvalidArgument", err)
		}
	})
}

func TestPanicBecomesInternal(t *testing.T) {
	_, client, _ := start(t, nil)
	ctx := grpctest.WithToken(ctxT(t), goodToken)
	req := valid()
	req.IdempotencyKey = "panic"
	_, err := client.Submit(ctx, req)
	if status.Code(err) != codes.Internal {
		t.Fatalf("panicking handler: %v, want Internal", err)
	}
	if strings.Contains(status.Convert(err).Message(), "handler bug") {
		t.Errorf("panic value leaked to the caller: %q", status.Convert(err).Message())
	}
	// The server survives.
	if _, err := client.Submit(ctx, valid()); err != nil {
		t.Fatalf("call after a panic: %v", err)
	}
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	_, client, _ := start(t, reg)
	ctx := ctxT(t)
	if _, err := client.Submit(grpctest.WithToken(ctx, goodToken), valid()); err != nil {
		t.Fatal(err)
	}
	_, _ = client.Submit(ctx, valid())

	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	handled := map[string]float64{}
	started := false
	for _, mf := range mfs {
		switch mf.GetName() {
		case "grpc_server_handled_total":
			for _, m := range mf.GetMetric() {
				if label(m, "grpc_method") == "Submit" {
					handled[label(m, "grpc_code")] = m.GetCounter().GetValue()
				}
			}
		case "grpc_server_started_total":
			started = true
		}
	}
	// The unauthenticated call was refused before any interceptor (TestTapRefusesBeforeTheBody).
	if handled["OK"] != 1 || handled["Unauthenticated"] != 0 {
		t.Errorf("grpc_server_handled_total for Submit = %v, want OK 1 and Unauthenticated 0", handled)
	}
	if !started {
		t.Error("grpc_server_started_total missing")
	}
	// Ready initialised every method, so dashboards show zeros, not gaps.
	if _, ok := handled["Internal"]; !ok {
		t.Errorf("Submit not initialised for every code: %v", handled)
	}

	// A second server on the same registry is refused, not silently unmeasured.
	if _, err := grpcserver.New(grpcserver.Options{Registry: reg}); err == nil {
		t.Error("New registered its metrics twice in one registry")
	}
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

func TestNoAuthFunc(t *testing.T) {
	svc := &ingest{}
	conn := grpctest.Start(t, grpcserver.Options{}, func(s *grpc.Server) { ingestv1.RegisterIngestServiceServer(s, svc) })
	if _, err := ingestv1.NewIngestServiceClient(conn).Submit(ctxT(t), valid()); err != nil {
		t.Errorf("Submit without Auth configured: %v", err)
	}
}

func TestShutdown(t *testing.T) {
	srv, err := grpcserver.New(grpcserver.Options{})
	if err != nil {
		t.Fatal(err)
	}
	srv.Ready()
	// No call in flight: a graceful stop returns promptly and health says
	// NOT_SERVING (the health server was shut down).
	done := make(chan struct{})
	go func() {
		srv.Shutdown(context.Background())
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown of an idle server did not return")
	}
}

// TestTapRefusesBeforeTheBody: a call without a valid token is refused on
// its headers, before gRPC reads its message: a 3 MiB request gets
// Unauthenticated, and the server never started the call (no metrics
// interceptor, no handler), so it never held or decoded the body.
func TestTapRefusesBeforeTheBody(t *testing.T) {
	reg := prometheus.NewRegistry()
	svc, client, _ := start(t, reg)
	ctx := ctxT(t)
	big := valid()
	big.Impressions[0].Properties = strings.Repeat("x", 3<<20)
	for _, c := range []context.Context{ctx, grpctest.WithToken(ctx, "wrong")} {
		if _, err := client.Submit(c, big); status.Code(err) != codes.Unauthenticated {
			t.Fatalf("Submit without a valid token: %v, want Unauthenticated", err)
		}
	}
	if svc.calls.Load() != 0 {
		t.Error("handler ran")
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "grpc_server_started_total" && mf.GetName() != "grpc_server_msg_received_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			if label(m, "grpc_method") == "Submit" && m.GetCounter().GetValue() != 0 {
				t.Errorf("%s for Submit = %v: the refused call was started", mf.GetName(), m.GetCounter().GetValue())
			}
		}
	}
	// A valid token still works, on the same connection.
	if _, err := client.Submit(grpctest.WithToken(ctx, goodToken), valid()); err != nil {
		t.Fatal(err)
	}
}

// TestAdmitSpendsAndReturnsItsBudget: Admit sees each authenticated call on
// its headers, with the caller Auth found; a refusal reaches the client as
// sent; and every admitted call gives its budget back when it ends, however
// it ends (an answer, an error, a stream closed by the client).
func TestAdmitSpendsAndReturnsItsBudget(t *testing.T) {
	var inUse, admitted atomic.Int32
	var refuse atomic.Bool
	svc := &ingest{}
	conn := grpctest.Start(t, grpcserver.Options{Auth: auth, Admit: func(ctx context.Context, method string) (func(), error) {
		if caller, _ := ctx.Value(callerKey{}).(string); caller != "caller-1" {
			return nil, status.Errorf(codes.Internal, "admit saw caller %q", caller)
		}
		if refuse.Load() {
			return nil, status.Error(codes.ResourceExhausted, "busy")
		}
		admitted.Add(1)
		inUse.Add(1)
		return func() { inUse.Add(-1) }, nil
	}}, func(s *grpc.Server) { ingestv1.RegisterIngestServiceServer(s, svc) })
	client := ingestv1.NewIngestServiceClient(conn)
	ctx := grpctest.WithToken(ctxT(t), goodToken)
	for range 5 {
		if _, err := client.Submit(ctx, valid()); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := client.Submit(ctx, &ingestv1.SubmitRequest{IdempotencyKey: "panic", Impressions: valid().Impressions}); status.Code(err) != codes.Internal {
		t.Fatalf("panicking call: %v", err)
	}
	st, err := client.SubmitStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&ingestv1.SubmitStreamRequest{Sequence: 1, Batch: valid()}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}
	_ = st.CloseSend()
	for {
		if _, err := st.Recv(); err != nil {
			break
		}
	}
	refuse.Store(true)
	if _, err := client.Submit(ctx, valid()); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("refused call: %v, want ResourceExhausted", err)
	}
	if got := admitted.Load(); got != 7 {
		t.Errorf("admitted %d calls, want 7", got)
	}
	poll.CheckFor(t, 10*time.Second, 10*time.Millisecond, func() error {
		if n := inUse.Load(); n != 0 {
			return fmt.Errorf("%d calls still hold their budget after ending", n)
		}
		return nil
	})
}
