// Package pipeline tests the data plane end to end: gRPC ingest, routing,
// per-destination delivery and parking, with every service running for real
// against an embedded JetStream and real HTTP receivers.
package pipeline

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/bulkhead-io/bulkhead/e2e/internal/stack"
	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/leaktest"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
	"github.com/bulkhead-io/bulkhead/pkg/testkit"
)

func TestMain(m *testing.M) { leaktest.VerifyTestMain(m) }

func start(t *testing.T, tune func(*stack.Configs)) (*stack.Stack, ingestv1.IngestServiceClient, adminv1.AdminServiceClient) {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end")
	}
	return stack.StartT(t, stack.Options{StoreDir: t.TempDir(), Tune: tune, Log: stack.TestLogger(t)})
}

func receiver(t *testing.T) *stack.Receiver {
	r := stack.NewReceiver()
	t.Cleanup(r.Close)
	return r
}

func admin(ctx context.Context) context.Context { return stack.WithToken(ctx, stack.AdminToken) }

func create(t *testing.T, adm adminv1.AdminServiceClient, d *adminv1.Destination, r *stack.Receiver) *adminv1.Destination {
	t.Helper()
	d.Url, d.Enabled = r.URL(), true
	if d.Linger == nil {
		d.Linger = durationpb.New(50 * time.Millisecond)
	}
	resp, err := adm.CreateDestination(admin(context.Background()), &adminv1.CreateDestinationRequest{Destination: d})
	if err != nil {
		t.Fatalf("create %s: %v", d.GetId(), err)
	}
	if !strings.HasPrefix(resp.GetDestination().GetSecret(), "whsec_") {
		t.Fatalf("create %s: no generated secret", d.GetId())
	}
	if err := r.SetSecret(resp.GetDestination().GetSecret()); err != nil {
		t.Fatal(err)
	}
	return resp.GetDestination()
}

// impression is one impression with every field set, so the test can check
// each reaches the receiver intact.
func impression(key, split string) *ingestv1.Impression {
	return testkit.Impressions(key, 1, testkit.Full, func(_ int, imp *ingestv1.Impression) {
		imp.Key, imp.BucketingKey, imp.Split, imp.Time = key, key, split, time.Now().UnixMilli()
	})[0]
}

// submitAll sends n impressions per tenant concurrently in batches of 100.
// Keys are "<tenant>-<i>"; odd ones are of split "s-b", even ones "s-a".
func submitAll(t *testing.T, ing ingestv1.IngestServiceClient, tenants []string, n int) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, len(tenants)*4)
	for _, tenant := range tenants {
		for w := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx := stack.WithToken(context.Background(), "key-"+tenant)
				for start := w * 100; start < n; start += 400 {
					req := &ingestv1.SubmitRequest{IdempotencyKey: fmt.Sprintf("%s-%d", tenant, start)}
					for i := start; i < min(start+100, n); i++ {
						split := "s-a"
						if i%2 == 1 {
							split = "s-b"
						}
						req.Impressions = append(req.Impressions, impression(fmt.Sprintf("%s-%d", tenant, i), split))
					}
					if _, err := ing.Submit(ctx, req); err != nil {
						errs <- fmt.Errorf("submit %s: %w", req.IdempotencyKey, err)
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func wantKeys(tenant string, n int, keep func(i int) bool) map[string]bool {
	out := map[string]bool{}
	for i := range n {
		if keep == nil || keep(i) {
			out[fmt.Sprintf("%s-%d", tenant, i)] = true
		}
	}
	return out
}

// exactly checks that a receiver got every wanted key and no other.
func exactly(r *stack.Receiver, want map[string]bool) error {
	snap := r.Snapshot()
	for k := range want {
		if snap.Keys[k] == 0 {
			return fmt.Errorf("missing %s (%d of %d received)", k, len(snap.Keys), len(want))
		}
	}
	for k := range snap.Keys {
		if !want[k] {
			return fmt.Errorf("unexpected impression %s", k)
		}
	}
	return nil
}

func parkedKeys(t *testing.T, adm adminv1.AdminServiceClient, dest string) (map[string]bool, []string) {
	t.Helper()
	stream, err := adm.ExportParked(stack.WithToken(context.Background(), stack.ViewerToken), &adminv1.ExportParkedRequest{Id: dest})
	if err != nil {
		t.Fatal(err)
	}
	keys := map[string]bool{}
	var reasons []string
	for {
		m, err := stream.Recv()
		if err == io.EOF {
			return keys, reasons
		}
		if err != nil {
			t.Fatalf("export %s: %v", dest, err)
		}
		reasons = append(reasons, m.GetParkReason())
		for _, imp := range m.GetImpressions() {
			keys[imp.GetKey()] = true
		}
	}
}

// TestAcceptedIsDeliveredOrParked is the pipeline's core scenario: three
// tenants, five destinations (one filtered, one failing for a while, one
// refusing with 400), 20,000 impressions submitted concurrently.
func TestAcceptedIsDeliveredOrParked(t *testing.T) {
	_, ing, adm := start(t, nil)
	all := receiver(t)       // t1, everything
	filtered := receiver(t)  // t1, split s-a only
	flaky := receiver(t)     // t2, 500 at first
	gzipped := receiver(t)   // t3, everything, gzip
	rejecting := receiver(t) // t3, 400 always
	flaky.Status.Store(500)
	rejecting.Status.Store(400)

	create(t, adm, &adminv1.Destination{Id: "d-all", TenantId: "t1"}, all)
	create(t, adm, &adminv1.Destination{Id: "d-filtered", TenantId: "t1", Filter: &adminv1.Filter{Splits: []string{"s-a"}}}, filtered)
	create(t, adm, &adminv1.Destination{Id: "d-flaky", TenantId: "t2"}, flaky)
	create(t, adm, &adminv1.Destination{Id: "d-gzip", TenantId: "t3", Gzip: true}, gzipped)
	create(t, adm, &adminv1.Destination{Id: "d-400", TenantId: "t3"}, rejecting)

	const n = 6667 // 3 × 6,667 = 20,001 impressions
	submitAll(t, ing, []string{"t1", "t2", "t3"}, n)

	// The flaky destination recovers after a while and must then get everything.
	poll.CheckFor(t, 60*time.Second, 100*time.Millisecond, func() error {
		if r := flaky.Snapshot().Requests; r < 3 {
			return fmt.Errorf("flaky destination saw %d requests", r)
		}
		return nil
	})
	flaky.Status.Store(0)

	checks := []struct {
		name string
		r    *stack.Receiver
		want map[string]bool
	}{
		{"d-all", all, wantKeys("t1", n, nil)},
		{"d-filtered", filtered, wantKeys("t1", n, func(i int) bool { return i%2 == 0 })},
		{"d-flaky", flaky, wantKeys("t2", n, nil)},
		{"d-gzip", gzipped, wantKeys("t3", n, nil)},
	}
	for _, c := range checks {
		poll.CheckFor(t, 120*time.Second, 200*time.Millisecond, func() error { return exactly(c.r, c.want) })
		snap := c.r.Snapshot()
		if snap.BadSignatures > 0 || snap.BadBodies > 0 {
			t.Errorf("%s: %d bad signatures, %d bad bodies", c.name, snap.BadSignatures, snap.BadBodies)
		}
		dups := 0
		for _, v := range snap.Keys {
			dups += v - 1
		}
		t.Logf("%s: %d impressions in %d requests, %d duplicates", c.name, len(snap.Keys), snap.Requests, dups)
	}
	if snap := gzipped.Snapshot(); snap.Gzipped == 0 {
		t.Error("d-gzip: no gzip request received")
	}
	// The body is the documented format, every field carried over.
	item := all.Snapshot().Items[0]
	if item.EnvironmentName != "prod" || item.MachineIP != "10.0.0.7" || item.SplitVersionNumber != 1699999999999 ||
		item.SDKVersion != "6.4.0" || item.Properties != "{}" || item.Label != "default rule" {
		t.Errorf("body item lost fields: %+v", item)
	}

	// Everything for the 400 destination is parked, with the reason.
	want := wantKeys("t3", n, nil)
	var reasons []string
	poll.CheckFor(t, 120*time.Second, 500*time.Millisecond, func() error {
		var got map[string]bool
		got, reasons = parkedKeys(t, adm, "d-400")
		if len(got) != len(want) {
			return fmt.Errorf("d-400: %d of %d impressions parked", len(got), len(want))
		}
		return nil
	})
	saw400 := false
	for _, r := range reasons {
		saw400 = saw400 || strings.Contains(r, "400")
	}
	if !saw400 {
		t.Errorf("no parked batch names the 400: %v", reasons[:min(5, len(reasons))])
	}
	if rejecting.Distinct() != 0 {
		t.Errorf("a 400 counted as delivered")
	}
}

func TestRetriedSubmitIsStoredOnce(t *testing.T) {
	_, ing, adm := start(t, nil)
	r := receiver(t)
	create(t, adm, &adminv1.Destination{Id: "d1", TenantId: "t1"}, r)
	ctx := stack.WithToken(context.Background(), "key-t1")
	req := &ingestv1.SubmitRequest{IdempotencyKey: "retry-me", Impressions: []*ingestv1.Impression{impression("k1", "s"), impression("k2", "s")}}
	first, err := ing.Submit(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	second, err := ing.Submit(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if first.GetDuplicate() || !second.GetDuplicate() || first.GetBatchId() != second.GetBatchId() {
		t.Fatalf("first %v, second %v: want the second marked duplicate of the first", first, second)
	}
	marker := &ingestv1.SubmitRequest{Impressions: []*ingestv1.Impression{impression("k3", "s")}}
	if _, err := ing.Submit(ctx, marker); err != nil {
		t.Fatal(err)
	}
	poll.CheckFor(t, 60*time.Second, 100*time.Millisecond, func() error {
		if r.Snapshot().Keys["k3"] == 0 {
			return fmt.Errorf("marker not delivered yet")
		}
		return nil
	})
	if keys := r.Snapshot().Keys; keys["k1"] != 1 || keys["k2"] != 1 {
		t.Errorf("retried batch delivered %d and %d times, want once", keys["k1"], keys["k2"])
	}
}

func TestBadRequestsGetClearCodes(t *testing.T) {
	_, ing, adm := start(t, nil)
	r := receiver(t)
	good := stack.WithToken(context.Background(), "key-t1")
	big := &ingestv1.SubmitRequest{}
	for i := range 1001 {
		big.Impressions = append(big.Impressions, impression(fmt.Sprint(i), "s"))
	}
	heavy := &ingestv1.SubmitRequest{}
	for i := range 900 {
		imp := impression(fmt.Sprint(i), "s")
		imp.Properties = strings.Repeat("x", 1400)
		heavy.Impressions = append(heavy.Impressions, imp)
	}
	submits := []struct {
		name string
		ctx  context.Context
		req  *ingestv1.SubmitRequest
		want codes.Code
	}{
		{"no key", context.Background(), &ingestv1.SubmitRequest{Impressions: []*ingestv1.Impression{impression("a", "s")}}, codes.Unauthenticated},
		{"unknown key", stack.WithToken(context.Background(), "nope-nope"), &ingestv1.SubmitRequest{Impressions: []*ingestv1.Impression{impression("a", "s")}}, codes.Unauthenticated},
		{"empty batch", good, &ingestv1.SubmitRequest{}, codes.InvalidArgument},
		{"too many", good, big, codes.InvalidArgument},
		{"too many bytes", good, heavy, codes.InvalidArgument},
		{"no split", good, &ingestv1.SubmitRequest{Impressions: []*ingestv1.Impression{{Key: "a", Treatment: "on", Time: 1}}}, codes.InvalidArgument},
		{"bad idempotency key", good, &ingestv1.SubmitRequest{IdempotencyKey: "a b", Impressions: []*ingestv1.Impression{impression("a", "s")}}, codes.InvalidArgument},
	}
	for _, c := range submits {
		_, err := ing.Submit(c.ctx, c.req)
		if got := status.Code(err); got != c.want {
			t.Errorf("submit %s: %v, want %v", c.name, err, c.want)
		}
	}

	dest := func(id, tenant, url string) *adminv1.CreateDestinationRequest {
		return &adminv1.CreateDestinationRequest{Destination: &adminv1.Destination{Id: id, TenantId: tenant, Url: url, Enabled: true}}
	}
	creates := []struct {
		name string
		ctx  context.Context
		req  *adminv1.CreateDestinationRequest
		want codes.Code
	}{
		{"no token", context.Background(), dest("ok", "t1", r.URL()), codes.Unauthenticated},
		{"read-only token", stack.WithToken(context.Background(), stack.ViewerToken), dest("ok", "t1", r.URL()), codes.PermissionDenied},
		{"id with a dot", admin(context.Background()), dest("a.b", "t1", r.URL()), codes.InvalidArgument},
		{"id with a wildcard", admin(context.Background()), dest("a>", "t1", r.URL()), codes.InvalidArgument},
		{"tenant with a space", admin(context.Background()), dest("ok", "t 1", r.URL()), codes.InvalidArgument},
		{"not a url", admin(context.Background()), dest("ok", "t1", "not a url"), codes.InvalidArgument},
		{"ftp url", admin(context.Background()), dest("ok", "t1", "ftp://example.com/x"), codes.InvalidArgument},
		{"private ip", admin(context.Background()), dest("ok", "t1", "http://10.1.2.3/hook"), codes.InvalidArgument},
		{"link-local ip", admin(context.Background()), dest("ok", "t1", "http://169.254.169.254/latest"), codes.InvalidArgument},
		{"bad secret", admin(context.Background()), &adminv1.CreateDestinationRequest{Destination: &adminv1.Destination{Id: "ok", TenantId: "t1", Url: r.URL(), Secret: "whsec_c2hvcnQ="}}, codes.InvalidArgument},
	}
	for _, c := range creates {
		_, err := adm.CreateDestination(c.ctx, c.req)
		if got := status.Code(err); got != c.want {
			t.Errorf("create %s: %v, want %v", c.name, err, c.want)
		}
	}
	create(t, adm, &adminv1.Destination{Id: "dup", TenantId: "t1"}, r)
	if _, err := adm.CreateDestination(admin(context.Background()), dest("dup", "t1", r.URL())); status.Code(err) != codes.AlreadyExists {
		t.Errorf("create twice: %v, want AlreadyExists", err)
	}
	if _, err := adm.GetDestination(admin(context.Background()), &adminv1.GetDestinationRequest{Id: "missing"}); status.Code(err) != codes.NotFound {
		t.Errorf("get missing: %v, want NotFound", err)
	}
	got, err := adm.GetDestination(stack.WithToken(context.Background(), stack.ViewerToken), &adminv1.GetDestinationRequest{Id: "dup"})
	if err != nil || got.GetDestination().GetSecret() != "" {
		t.Errorf("get: %v, secret %q; want no secret", err, got.GetDestination().GetSecret())
	}
}
