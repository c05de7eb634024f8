package scenario

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/bulkhead-io/bulkhead/e2e/internal/sharedqueue"
	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/webhook"
)

// Target is a system under test, seen from outside.
type Target interface {
	// Setup registers destination i (tenant i) at urls[i] with the
	// scenario's linger, timeout and batch size.
	Setup(ctx context.Context, cfg Config, urls []string) error
	// Submit hands tenant i's batch to the system; nil means accepted.
	// idem is stable across retries of the same batch.
	Submit(ctx context.Context, tenant int, idem string, items []*ingestv1.Impression) error
	// Close releases the target's clients (not the system itself).
	Close() error
}

// Quarantiner is a Target whose destinations can be quarantined.
type Quarantiner interface {
	// WatchQuarantine calls fn for every state decision until ctx ends.
	WatchQuarantine(ctx context.Context, fn func(dest int, state eventv1.State, at time.Time)) error
}

// Parker is a Target that parks impressions it does not deliver.
type Parker interface {
	// Parked calls fn with the key of every impression parked for
	// destination i.
	Parked(ctx context.Context, dest int, fn func(key string)) error
}

// ParkCounter is a Target that counts, by its own metrics, the impressions
// it parked, per destination.
type ParkCounter interface {
	ParkedImpressions(ctx context.Context) (map[int]int64, error)
}

// Bulkhead drives a running Bulkhead through its public gRPC APIs.
type Bulkhead struct {
	// MetricsURLs, when set, are the router's and deliverer's /metrics
	// URLs, read for the parked-impression counters.
	MetricsURLs []string

	ingest []ingestv1.IngestServiceClient
	admin  adminv1.AdminServiceClient
	conns  []*grpc.ClientConn
	token  string
	keys   []string // per tenant
	mu     sync.Mutex
	next   int
}

// APIKey is the ingest API key of tenant i, as Bulkhead must be configured
// (see KeyPairs).
func APIKey(i int) string { return fmt.Sprintf("bench-key-%05d", i) }

// TenantID and DestinationID name tenant i and its destination.
func TenantID(i int) string { return fmt.Sprintf("t%05d", i) }

// DestinationID names destination i.
func DestinationID(i int) string { return fmt.Sprintf("d%05d", i) }

// destIndex inverts DestinationID.
func destIndex(id string) (int, bool) {
	var i int
	if _, err := fmt.Sscanf(id, "d%05d", &i); err != nil || DestinationID(i) != id {
		return 0, false
	}
	return i, true
}

// KeyPairs returns the "key=tenant" pairs for n tenants.
func KeyPairs(n int) []string {
	out := make([]string, n)
	for i := range n {
		out[i] = APIKey(i) + "=" + TenantID(i)
	}
	return out
}

// NewBulkhead connects to a Bulkhead's ingest and admin addresses; token is
// an operator admin token. It opens conns connections to ingest and spreads
// submissions over them.
func NewBulkhead(ingestAddr, adminAddr, token string, conns int) (*Bulkhead, error) {
	b := &Bulkhead{token: token}
	for range max(conns, 1) {
		c, err := grpc.NewClient(ingestAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			_ = b.Close()
			return nil, fmt.Errorf("dial ingest %s: %w", ingestAddr, err)
		}
		b.conns = append(b.conns, c)
		b.ingest = append(b.ingest, ingestv1.NewIngestServiceClient(c))
	}
	c, err := grpc.NewClient(adminAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		_ = b.Close()
		return nil, fmt.Errorf("dial admin %s: %w", adminAddr, err)
	}
	b.conns = append(b.conns, c)
	b.admin = adminv1.NewAdminServiceClient(c)
	return b, nil
}

func (b *Bulkhead) adminCtx(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+b.token)
}

// Ready waits until both APIs answer, at most until ctx ends.
func (b *Bulkhead) Ready(ctx context.Context) error {
	for {
		_, aerr := b.admin.ListDestinations(b.adminCtx(ctx), &adminv1.ListDestinationsRequest{})
		// An unauthenticated answer proves the ingest server is serving.
		_, ierr := b.ingest[0].Submit(ctx, &ingestv1.SubmitRequest{})
		if aerr == nil && status.Code(ierr) != codes.Unavailable && ctx.Err() == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for bulkhead: admin %v, ingest %v: %w", aerr, ierr, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Setup creates one destination per tenant, a few at a time.
func (b *Bulkhead) Setup(ctx context.Context, cfg Config, urls []string) error {
	b.keys = make([]string, len(urls))
	for i := range urls {
		b.keys[i] = APIKey(i)
	}
	sem := make(chan struct{}, 8)
	errs := make(chan error, len(urls))
	var wg sync.WaitGroup
	for i, u := range urls {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			_, err := b.admin.CreateDestination(b.adminCtx(cctx), &adminv1.CreateDestinationRequest{Destination: &adminv1.Destination{
				Id: DestinationID(i), TenantId: TenantID(i), Url: u, Enabled: true,
				Linger: durationpb.New(cfg.Linger), Timeout: durationpb.New(cfg.Timeout),
				MaxBatchImpressions: int32(cfg.MaxBatch),
			}})
			if err != nil {
				errs <- fmt.Errorf("create %s: %w", DestinationID(i), err)
			}
		})
	}
	wg.Wait()
	close(errs)
	return errors.Join(slicesOf(errs)...)
}

func slicesOf(ch chan error) []error {
	var out []error
	for e := range ch {
		out = append(out, e)
	}
	return out
}

// Submit sends one SubmitRequest with tenant's API key.
func (b *Bulkhead) Submit(ctx context.Context, tenant int, idem string, items []*ingestv1.Impression) error {
	b.mu.Lock()
	c := b.ingest[b.next%len(b.ingest)]
	b.next++
	b.mu.Unlock()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+b.keys[tenant])
	_, err := c.Submit(ctx, &ingestv1.SubmitRequest{IdempotencyKey: idem, Impressions: items})
	return err
}

// WatchQuarantine follows the monitor's decisions, reconnecting when the
// stream ends, until ctx ends.
func (b *Bulkhead) WatchQuarantine(ctx context.Context, fn func(int, eventv1.State, time.Time)) error {
	for ctx.Err() == nil {
		st, err := b.admin.WatchDecisions(b.adminCtx(ctx), &adminv1.WatchDecisionsRequest{})
		if err == nil {
			for {
				m, rerr := st.Recv()
				if rerr != nil {
					break
				}
				d := m.GetDecision()
				i, ok := destIndex(d.GetDestinationId())
				if !ok {
					continue
				}
				at := time.Now()
				if d.GetSince().IsValid() {
					at = d.GetSince().AsTime()
				}
				fn(i, d.GetState(), at)
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
	return nil
}

// Parked exports destination i's parked impressions.
func (b *Bulkhead) Parked(ctx context.Context, dest int, fn func(string)) error {
	st, err := b.admin.ExportParked(b.adminCtx(ctx), &adminv1.ExportParkedRequest{Id: DestinationID(dest)})
	if err != nil {
		return fmt.Errorf("export %s: %w", DestinationID(dest), err)
	}
	for {
		m, err := st.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("export %s: %w", DestinationID(dest), err)
		}
		for _, im := range m.GetImpressions() {
			fn(im.GetKey())
		}
	}
}

// parkMetrics are the counters of impressions put into PARKED: by the
// router (destination quarantined or paused) and by the deliverer (failed
// permanently, retries exhausted, or quarantined while waiting).
var parkMetrics = []struct{ name, must string }{
	{"bulkhead_router_impressions_total{", `action="park"`},
	{"bulkhead_deliverer_impressions_parked_total{", ""},
}

// ParkedImpressions sums the parked-impression counters of MetricsURLs by
// destination.
func (b *Bulkhead) ParkedImpressions(ctx context.Context) (map[int]int64, error) {
	if len(b.MetricsURLs) == 0 {
		return nil, errors.New("no metrics urls")
	}
	out := map[int]int64{}
	for _, u := range b.MetricsURLs {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return nil, err
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return nil, fmt.Errorf("scrape %s: %w", u, err)
		}
		body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
		resp.Body.Close()
		if err != nil {
			return nil, fmt.Errorf("scrape %s: %w", u, err)
		}
		for line := range strings.SplitSeq(string(body), "\n") {
			for _, m := range parkMetrics {
				if !strings.HasPrefix(line, m.name) || !strings.Contains(line, m.must) {
					continue
				}
				_, rest, _ := strings.Cut(line, `destination="`)
				id, _, _ := strings.Cut(rest, `"`)
				i, ok := destIndex(id)
				sp := strings.LastIndexByte(line, ' ')
				v, err := strconv.ParseFloat(line[sp+1:], 64)
				if ok && err == nil {
					out[i] += int64(v)
				}
			}
		}
	}
	return out, nil
}

// Close closes the gRPC connections.
func (b *Bulkhead) Close() error {
	var errs []error
	for _, c := range b.conns {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

// SharedQueue is the in-process reference model of the shared-worker design
// (package sharedqueue), fed the same schedule.
type SharedQueue struct {
	Opts sharedqueue.Options
	Q    *sharedqueue.Queue
	urls []string
}

// Setup starts the queue with the scenario's timeout, linger and batch
// size, and the deliverer's body encoder.
func (s *SharedQueue) Setup(_ context.Context, cfg Config, urls []string) error {
	o := s.Opts
	o.RequestTimeout, o.Linger, o.MaxBatch = cfg.Timeout, cfg.Linger, cfg.MaxBatch
	o.Encode = webhook.EncodeBody
	q, err := sharedqueue.New(o)
	if err != nil {
		return err
	}
	s.Q, s.urls = q, urls
	return nil
}

// Submit enqueues the batch for the tenant's destination.
func (s *SharedQueue) Submit(_ context.Context, tenant int, _ string, items []*ingestv1.Impression) error {
	return s.Q.Submit(s.urls[tenant], items)
}

// Close stops the queue, abandoning what it still holds.
func (s *SharedQueue) Close() error {
	if s.Q != nil {
		s.Q.Close()
	}
	return nil
}
