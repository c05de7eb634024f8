package api_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/bulkhead-io/bulkhead/pkg/admission"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/grpcserver"
	"github.com/bulkhead-io/bulkhead/pkg/grpctest"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/testkit"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/bulkhead-io/bulkhead/services/ingest/internal/api"
	"github.com/bulkhead-io/bulkhead/services/ingest/internal/keys"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const (
	keyT1 = "key-of-t1"
	keyT2 = "key-of-t2"
)

type fixture struct {
	js     jetstream.JetStream
	client ingestv1.IngestServiceClient
	ctx    context.Context // carries t1's key
}

// start serves IngestService over bufconn with the real interceptor chain,
// publishing to a real JetStream whose streams are sized by sl.
func start(t *testing.T, lim api.Limits, sl stream.Limits) *fixture {
	t.Helper()
	js := testkit.JetStream(t, sl).JS
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	ks, err := keys.Parse([]string{keyT1 + "=t1", keyT2 + "=t2"})
	if err != nil {
		t.Fatal(err)
	}
	if lim.PublishTimeout == 0 {
		lim.PublishTimeout = 10 * time.Second
	}
	if lim.MaxBatchBytes == 0 {
		lim.MaxBatchBytes = 1 << 20
	}
	log := slog.New(slog.DiscardHandler)
	refusals, err := admission.Open(ctx, js, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(refusals.Stop)
	srv, err := api.New(js, ks, refusals, lim, log, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	conn := grpctest.Start(t, grpcserver.Options{Auth: srv.Authenticate, Admit: srv.Admit, MaxRecvMsgSize: srv.MaxRecvMsgSize()},
		func(s *grpc.Server) { ingestv1.RegisterIngestServiceServer(s, srv) })
	return &fixture{js: js, client: ingestv1.NewIngestServiceClient(conn), ctx: grpctest.WithToken(ctx, keyT1)}
}

// impressions returns n impressions with properties props.
func impressions(n int, props string) []*ingestv1.Impression {
	return testkit.Impressions("user", n, func(_ int, imp *ingestv1.Impression) { imp.Properties = props })
}

// stored returns the batches stored on imp.in.<tenant>, in order.
func (f *fixture) stored(t *testing.T, tenant string) []*eventv1.Batch {
	t.Helper()
	subj, _ := topology.In(tenant)
	s, err := f.js.Stream(context.Background(), topology.StreamImpressions)
	if err != nil {
		t.Fatal(err)
	}
	var out []*eventv1.Batch
	for seq := uint64(1); ; {
		m, err := s.GetMsg(context.Background(), seq, jetstream.WithGetMsgSubject(subj))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		var b eventv1.Batch
		if err := proto.Unmarshal(m.Data, &b); err != nil {
			t.Fatalf("stored message is not a Batch: %v", err)
		}
		out = append(out, &b)
		seq = m.Sequence + 1
	}
}

func TestSubmitStoresOneBatch(t *testing.T) {
	f := start(t, api.Limits{}, stream.Limits{})
	imps := impressions(3, "{}")
	resp, err := f.client.Submit(f.ctx, &ingestv1.SubmitRequest{Impressions: imps})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetAccepted() != 3 || resp.GetDuplicate() || resp.GetBatchId() == "" {
		t.Errorf("response = %v", resp)
	}
	got := f.stored(t, "t1")
	if len(got) != 1 {
		t.Fatalf("stored %d batches on imp.in.t1, want 1", len(got))
	}
	b := got[0]
	if b.GetBatchId() != resp.GetBatchId() || b.GetTenantId() != "t1" || b.GetAcceptedAt() == nil || b.GetDestinationId() != "" {
		t.Errorf("stored batch header = %v", b)
	}
	if len(b.GetImpressions()) != 3 {
		t.Fatalf("stored %d impressions, want 3", len(b.GetImpressions()))
	}
	for i := range imps {
		if !proto.Equal(b.GetImpressions()[i], imps[i]) {
			t.Errorf("impression %d = %v, want %v", i, b.GetImpressions()[i], imps[i])
		}
	}
	if n := len(f.stored(t, "t2")); n != 0 {
		t.Errorf("t1's batch landed on t2's subject too (%d)", n)
	}
}

func TestIdempotencyKeyDedupes(t *testing.T) {
	f := start(t, api.Limits{}, stream.Limits{})
	req := &ingestv1.SubmitRequest{Impressions: impressions(2, ""), IdempotencyKey: "retry-1"}
	first, err := f.client.Submit(f.ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	second, err := f.client.Submit(f.ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if first.GetDuplicate() || !second.GetDuplicate() {
		t.Errorf("duplicate flags = %v, %v; want false, true", first.GetDuplicate(), second.GetDuplicate())
	}
	if first.GetBatchId() != second.GetBatchId() {
		t.Errorf("batch ids differ: %s, %s", first.GetBatchId(), second.GetBatchId())
	}
	if n := len(f.stored(t, "t1")); n != 1 {
		t.Errorf("stored %d batches, want 1", n)
	}

	// Keys are per tenant: t2 using the same key is a different batch.
	other, err := f.client.Submit(grpctest.WithToken(context.Background(), keyT2), req)
	if err != nil {
		t.Fatal(err)
	}
	if other.GetDuplicate() || other.GetBatchId() == first.GetBatchId() {
		t.Errorf("t2's batch with t1's key = %v", other)
	}
	// Without a key every submission is its own batch.
	for range 2 {
		if _, err := f.client.Submit(f.ctx, &ingestv1.SubmitRequest{Impressions: impressions(1, "")}); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(f.stored(t, "t1")); n != 3 {
		t.Errorf("stored %d batches, want 3", n)
	}
}

func TestOversizedBatchIsInvalid(t *testing.T) {
	f := start(t, api.Limits{MaxBatchBytes: 2048}, stream.Limits{})
	big := `{"blob":"` + strings.Repeat("x", 1500) + `"}`
	_, err := f.client.Submit(f.ctx, &ingestv1.SubmitRequest{Impressions: impressions(2, big)})
	st := status.Convert(err)
	if st.Code() != codes.InvalidArgument {
		t.Fatalf("Submit = %v, want InvalidArgument", err)
	}
	var violation *errdetails.BadRequest_FieldViolation
	for _, d := range st.Details() {
		if br, ok := d.(*errdetails.BadRequest); ok && len(br.GetFieldViolations()) > 0 {
			violation = br.GetFieldViolations()[0]
		}
	}
	if violation == nil || violation.GetField() != "impressions" || !strings.Contains(violation.GetDescription(), "2048") {
		t.Errorf("details = %v, want a BadRequest violation on impressions naming the limit", st.Details())
	}
	if n := len(f.stored(t, "t1")); n != 0 {
		t.Errorf("stored %d batches, want 0", n)
	}
	// A batch under the limit still goes through.
	if _, err := f.client.Submit(f.ctx, &ingestv1.SubmitRequest{Impressions: impressions(1, "{}")}); err != nil {
		t.Errorf("small batch: %v", err)
	}
}

func retryDelay(err error) time.Duration {
	for _, d := range status.Convert(err).Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			return ri.GetRetryDelay().AsDuration()
		}
	}
	return -1
}

func TestTenantRateLimit(t *testing.T) {
	f := start(t, api.Limits{TenantRate: 1, TenantBurst: 5}, stream.Limits{})
	if _, err := f.client.Submit(f.ctx, &ingestv1.SubmitRequest{Impressions: impressions(5, "")}); err != nil {
		t.Fatalf("within the burst: %v", err)
	}
	for _, tc := range []struct {
		name string
		n    int
	}{
		{"over the rate", 1},
		{"bigger than the burst", 6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := f.client.Submit(f.ctx, &ingestv1.SubmitRequest{Impressions: impressions(tc.n, "")})
			if status.Code(err) != codes.ResourceExhausted {
				t.Fatalf("Submit = %v, want ResourceExhausted", err)
			}
			if d := retryDelay(err); d <= 0 {
				t.Errorf("RetryInfo delay = %v, want > 0", d)
			}
		})
	}
	if n := len(f.stored(t, "t1")); n != 1 {
		t.Errorf("stored %d batches, want 1", n)
	}
	// Limits are per tenant.
	if _, err := f.client.Submit(grpctest.WithToken(context.Background(), keyT2), &ingestv1.SubmitRequest{Impressions: impressions(5, "")}); err != nil {
		t.Errorf("t2 limited by t1's traffic: %v", err)
	}
}

func TestFullStreamRefusesAndStoresNothing(t *testing.T) {
	f := start(t, api.Limits{}, stream.Limits{ImpressionsMaxBytes: 2048})
	req := func() *ingestv1.SubmitRequest {
		return &ingestv1.SubmitRequest{Impressions: impressions(2, `{"pad":"`+strings.Repeat("p", 200)+`"}`)}
	}
	accepted := 0
	var err error
	for range 50 {
		if _, err = f.client.Submit(f.ctx, req()); err != nil {
			break
		}
		accepted++
	}
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("after %d batches: %v, want ResourceExhausted", accepted, err)
	}
	if d := retryDelay(err); d <= 0 {
		t.Errorf("RetryInfo delay = %v, want > 0", d)
	}
	if accepted == 0 {
		t.Fatal("the stream refused even the first batch; the test's sizes are off")
	}
	// An OK answer means stored; a refusal means nothing was stored.
	if n := len(f.stored(t, "t1")); n != accepted {
		t.Errorf("stored %d batches, answered OK %d times", n, accepted)
	}

	t.Run("stream", func(t *testing.T) {
		st, err := f.client.SubmitStream(f.ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Send(&ingestv1.SubmitStreamRequest{Batch: req(), Sequence: 1}); err != nil {
			t.Fatal(err)
		}
		_ = st.CloseSend()
		resp, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if codes.Code(resp.GetErrorCode()) != codes.ResourceExhausted || resp.GetResult() != nil {
			t.Errorf("response = %v, want ResourceExhausted", resp)
		}
		if _, err := st.Recv(); !errors.Is(err, io.EOF) {
			t.Errorf("stream end = %v, want EOF", err)
		}
		if n := len(f.stored(t, "t1")); n != accepted {
			t.Errorf("stored %d batches, answered OK %d times", n, accepted)
		}
	})
}

func TestSubmitStreamAnswersInOrder(t *testing.T) {
	f := start(t, api.Limits{MaxBatchBytes: 4096}, stream.Limits{})
	st, err := f.client.SubmitStream(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	big := `{"blob":"` + strings.Repeat("x", 5000) + `"}`
	reqs := []*ingestv1.SubmitStreamRequest{
		{Sequence: 1, Batch: &ingestv1.SubmitRequest{Impressions: impressions(1, "")}},
		{Sequence: 2, Batch: &ingestv1.SubmitRequest{Impressions: impressions(2, ""), IdempotencyKey: "k2"}},
		{Sequence: 3, Batch: &ingestv1.SubmitRequest{}},                                 // protovalidate: no impressions
		{Sequence: 4, Batch: &ingestv1.SubmitRequest{Impressions: impressions(1, big)}}, // over the byte limit
		{Sequence: 5, Batch: &ingestv1.SubmitRequest{Impressions: impressions(2, ""), IdempotencyKey: "k2"}},
		{Sequence: 6, Batch: &ingestv1.SubmitRequest{Impressions: impressions(3, "")}},
	}
	for _, r := range reqs {
		if err := st.Send(r); err != nil {
			t.Fatalf("send %d: %v", r.GetSequence(), err)
		}
	}
	if err := st.CloseSend(); err != nil {
		t.Fatal(err)
	}
	var resps []*ingestv1.SubmitStreamResponse
	for {
		r, err := st.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("after %d answers: %v", len(resps), err)
		}
		resps = append(resps, r)
	}
	var seqs []uint64
	for _, r := range resps {
		seqs = append(seqs, r.GetSequence())
	}
	if !slices.Equal(seqs, []uint64{1, 2, 3, 4, 5, 6}) {
		t.Fatalf("answered %v, want every batch in order", seqs)
	}
	for _, i := range []int{2, 3} {
		if codes.Code(resps[i].GetErrorCode()) != codes.InvalidArgument || resps[i].GetResult() != nil || resps[i].GetErrorMessage() == "" {
			t.Errorf("answer %d = %v, want InvalidArgument", i+1, resps[i])
		}
	}
	for _, i := range []int{0, 1, 4, 5} {
		if resps[i].GetErrorCode() != 0 || resps[i].GetResult().GetAccepted() != int32(len(reqs[i].GetBatch().GetImpressions())) {
			t.Errorf("answer %d = %v, want stored", i+1, resps[i])
		}
	}
	if resps[1].GetResult().GetDuplicate() || !resps[4].GetResult().GetDuplicate() {
		t.Errorf("idempotency key not honoured on the stream: %v / %v", resps[1], resps[4])
	}
	var want, got []string
	for _, i := range []int{0, 1, 5} {
		want = append(want, resps[i].GetResult().GetBatchId())
	}
	for _, b := range f.stored(t, "t1") {
		got = append(got, b.GetBatchId())
	}
	if !slices.Equal(got, want) {
		t.Errorf("stored %v, want %v", got, want)
	}
}

func TestSubmitStreamClientGoesAway(t *testing.T) {
	f := start(t, api.Limits{}, stream.Limits{})
	ctx, cancel := context.WithCancel(f.ctx)
	st, err := f.client.SubmitStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if err := st.Send(&ingestv1.SubmitStreamRequest{Sequence: uint64(i), Batch: &ingestv1.SubmitRequest{Impressions: impressions(1, "")}}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}
	// Abandon the stream mid-way; the handler and its reader must end
	// (goleak checks) and the server keeps serving.
	cancel()
	if _, err := f.client.Submit(f.ctx, &ingestv1.SubmitRequest{Impressions: impressions(1, "")}); err != nil {
		t.Fatalf("Submit after an abandoned stream: %v", err)
	}
}

func TestAuthentication(t *testing.T) {
	f := start(t, api.Limits{}, stream.Limits{})
	req := &ingestv1.SubmitRequest{Impressions: impressions(1, "")}
	for _, tc := range []struct {
		name string
		ctx  context.Context
	}{
		{"no key", context.Background()},
		{"unknown key", grpctest.WithToken(context.Background(), "not-a-key")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(tc.ctx, 10*time.Second)
			defer cancel()
			if _, err := f.client.Submit(ctx, req); status.Code(err) != codes.Unauthenticated {
				t.Errorf("Submit = %v, want Unauthenticated", err)
			}
			st, err := f.client.SubmitStream(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := st.Recv(); status.Code(err) != codes.Unauthenticated {
				t.Errorf("SubmitStream = %v, want Unauthenticated", err)
			}
		})
	}
	if n := len(f.stored(t, "t1")); n != 0 {
		t.Errorf("stored %d batches, want 0", n)
	}
}

// TestBatchOverTheNATSPayloadIsRefusedForGood: with -max-batch-bytes at or
// above the NATS server's max_payload (1 MiB embedded, the default limit
// too), a batch near it used to be accepted with no room left for the
// envelope routing and parking add (closer still, answered Unavailable,
// "retry", forever). It is now refused as InvalidArgument, naming the limit
// that fits; one that fits is still stored.
func TestBatchOverTheNATSPayloadIsRefusedForGood(t *testing.T) {
	f := start(t, api.Limits{MaxBatchBytes: 1 << 20}, stream.Limits{})
	props := `{"blob":"` + strings.Repeat("x", 32000) + `"}`
	_, err := f.client.Submit(f.ctx, &ingestv1.SubmitRequest{Impressions: impressions(32, props)}) // ≈ 1,030,000 bytes
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("Submit of a batch over max_payload = %v, want InvalidArgument", err)
	}
	if want := fmt.Sprint(stream.MaxBatchBytes(f.js.Conn().MaxPayload())); !strings.Contains(status.Convert(err).Message(), want) {
		t.Errorf("message %q does not name the limit %s", status.Convert(err).Message(), want)
	}
	if _, err := f.client.Submit(f.ctx, &ingestv1.SubmitRequest{Impressions: impressions(29, props)}); err != nil { // ≈ 933,000 bytes
		t.Fatalf("Submit of a batch that fits: %v", err)
	}
}

// refusedWith checks that err is a retryable ResourceExhausted whose
// ErrorInfo carries reason, and returns the ErrorInfo's metadata.
func refusedWith(t *testing.T, err error, reason string) map[string]string {
	t.Helper()
	st, _ := status.FromError(err)
	if st.Code() != codes.ResourceExhausted {
		t.Fatalf("got %v, want ResourceExhausted", err)
	}
	var info *errdetails.ErrorInfo
	var retry *errdetails.RetryInfo
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.ErrorInfo:
			info = d
		case *errdetails.RetryInfo:
			retry = d
		}
	}
	if info == nil || info.GetReason() != reason || info.GetDomain() != admission.Domain {
		t.Fatalf("ErrorInfo %v, want reason %s", info, reason)
	}
	if retry == nil || retry.GetRetryDelay().AsDuration() <= 0 {
		t.Fatalf("RetryInfo %v, want a delay", retry)
	}
	return info.GetMetadata()
}

// TestTenantBacklogBudgetRefusesOnlyThatTenant: a tenant with its share of
// IMPRESSIONS full (nothing routes it here) is refused by JetStream, and
// told so; another tenant is stored as usual.
func TestTenantBacklogBudgetRefusesOnlyThatTenant(t *testing.T) {
	f := start(t, api.Limits{}, stream.Limits{TenantBacklog: 2})
	for range 2 {
		if _, err := f.client.Submit(f.ctx, &ingestv1.SubmitRequest{Impressions: impressions(1, "{}")}); err != nil {
			t.Fatal(err)
		}
	}
	_, err := f.client.Submit(f.ctx, &ingestv1.SubmitRequest{Impressions: impressions(1, "{}")})
	if md := refusedWith(t, err, admission.ReasonBacklogFull); md["tenant"] != "t1" {
		t.Errorf("metadata %v", md)
	}
	t2 := grpctest.WithToken(context.Background(), keyT2)
	if _, err := f.client.Submit(t2, &ingestv1.SubmitRequest{Impressions: impressions(1, "{}")}); err != nil {
		t.Fatalf("t2 refused with t1's share full: %v", err)
	}
	if got := len(f.stored(t, "t1")); got != 2 {
		t.Errorf("t1 has %d batches stored, want 2", got)
	}
}

// TestRefusedTenantIsRefusedWithItsReason: while the monitor's refusal of a
// tenant is in the admission bucket, ingest refuses that tenant's batches
// with the refusal's reason and budget, stores none of them, and serves
// everyone else; once lifted, the tenant is accepted again.
func TestRefusedTenantIsRefusedWithItsReason(t *testing.T) {
	f := start(t, api.Limits{}, stream.Limits{})
	ctx := context.Background()
	kv, err := f.js.KeyValue(ctx, topology.BucketAdmission)
	if err != nil {
		t.Fatal(err)
	}
	if err := admission.Store(ctx, kv, &eventv1.Refusal{
		TenantId: "t1", Reason: admission.ReasonParkedBudget, Detail: "destination d1 holds 9 parked batches", RetryAfterMs: 30000,
		Budget: &eventv1.Budget{Resource: "destination_parked", Used: 9, Limit: 10, Exhausted: true},
	}); err != nil {
		t.Fatal(err)
	}
	var last error
	poll.CheckFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		_, last = f.client.Submit(f.ctx, &ingestv1.SubmitRequest{Impressions: impressions(1, "{}")})
		if last == nil {
			return errors.New("t1 still accepted")
		}
		return nil
	})
	md := refusedWith(t, last, admission.ReasonParkedBudget)
	if md["resource"] != "destination_parked" || md["used"] != "9" || md["limit"] != "10" {
		t.Errorf("metadata %v", md)
	}
	if st, _ := status.FromError(last); !strings.Contains(st.Message(), "d1 holds 9 parked batches") {
		t.Errorf("message %q does not say why", st.Message())
	}
	before := len(f.stored(t, "t1"))
	if _, err := f.client.Submit(f.ctx, &ingestv1.SubmitRequest{Impressions: impressions(1, "{}")}); err == nil {
		t.Fatal("refused tenant accepted")
	}
	if got := len(f.stored(t, "t1")); got != before {
		t.Errorf("a refused batch was stored (%d -> %d)", before, got)
	}
	t2 := grpctest.WithToken(ctx, keyT2)
	if _, err := f.client.Submit(t2, &ingestv1.SubmitRequest{Impressions: impressions(1, "{}")}); err != nil {
		t.Fatalf("t2 refused: %v", err)
	}
	if err := admission.Lift(ctx, kv, "t1"); err != nil {
		t.Fatal(err)
	}
	poll.CheckFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		_, err := f.client.Submit(f.ctx, &ingestv1.SubmitRequest{Impressions: impressions(1, "{}")})
		return err
	})
}

// TestMemoryBudgetRefusesBeforeReading: calls reserve the request bytes
// they may make ingest hold before gRPC reads them. A tenant whose open
// stream holds most of its share is refused a Submit with INGEST_BUSY,
// while another tenant is served; once the stream ends its bytes are back.
func TestMemoryBudgetRefusesBeforeReading(t *testing.T) {
	const batch = 64 << 10 // a Submit reserves 2 × 64 KiB to read + 64 KiB to store
	f := start(t, api.Limits{MaxBatchBytes: batch, TenantInflightBytes: 3 * batch, MaxInflightBytes: 8 * batch}, stream.Limits{})
	st, err := f.client.SubmitStream(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&ingestv1.SubmitStreamRequest{Sequence: 1, Batch: &ingestv1.SubmitRequest{Impressions: impressions(1, "{}")}}); err != nil {
		t.Fatal(err)
	}
	if r, err := st.Recv(); err != nil || r.GetErrorCode() != 0 {
		t.Fatalf("stream batch: %v %v", r, err)
	}
	_, err = f.client.Submit(f.ctx, &ingestv1.SubmitRequest{Impressions: impressions(1, "{}")})
	if md := refusedWith(t, err, admission.ReasonIngestBusy); md["tenant"] != "t1" {
		t.Errorf("metadata %v", md)
	}
	t2 := grpctest.WithToken(context.Background(), keyT2)
	if _, err := f.client.Submit(t2, &ingestv1.SubmitRequest{Impressions: impressions(1, "{}")}); err != nil {
		t.Fatalf("t2 refused while t1 holds its share: %v", err)
	}
	if err := st.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("stream end: %v", err)
	}
	poll.CheckFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		_, err := f.client.Submit(f.ctx, &ingestv1.SubmitRequest{Impressions: impressions(1, "{}")})
		return err
	})
}

// TestRateCountsEveryDestination: a batch costs the pipeline one copy per
// destination of its tenant, so it is charged its impressions times that
// number: a tenant with 4 destinations gets a quarter of the impressions a
// tenant with one does, and the refusal says why.
func TestRateCountsEveryDestination(t *testing.T) {
	f := start(t, api.Limits{TenantRate: 1, TenantBurst: 1000, Fanout: func(tenant string) int {
		if tenant == "t1" {
			return 4
		}
		return 1
	}}, stream.Limits{})
	for i := range 2 {
		if _, err := f.client.Submit(f.ctx, &ingestv1.SubmitRequest{Impressions: impressions(125, "")}); err != nil {
			t.Fatalf("batch %d: 500 of 1,000 delivered impressions: %v", i+1, err)
		}
	}
	_, err := f.client.Submit(f.ctx, &ingestv1.SubmitRequest{Impressions: impressions(125, "")})
	refusedWith(t, err, admission.ReasonRateLimited)
	if st, _ := status.FromError(err); !strings.Contains(st.Message(), "125 impressions to 4 destinations") {
		t.Errorf("message %q does not say what the batch costs", st.Message())
	}
	t2 := grpctest.WithToken(context.Background(), keyT2)
	for i := range 8 {
		if _, err := f.client.Submit(t2, &ingestv1.SubmitRequest{Impressions: impressions(125, "")}); err != nil {
			t.Fatalf("t2 (one destination), batch %d: %v", i+1, err)
		}
	}
}
