// Package noisy runs one row of the noisy-neighbor matrix against a running
// Bulkhead: a few quiet tenants, each with one healthy destination, submit
// small batches steadily while one noisy tenant misbehaves in one shape
// (its endpoints hang, answer slowly, throttle or reject; it floods ingest,
// fills its parked budget, or sends maximum-size batches). It measures the
// quiet tenants' end-to-end latency, every impression by key (lost,
// duplicated), and what the noisy tenant met (refusals by reason, parked,
// delivered). After the load the noisy endpoints heal and a paused
// destination is resumed, so that what the noisy tenant had accepted can
// drain and be accounted too.
package noisy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/bulkhead-io/bulkhead/e2e/internal/fleet"
	"github.com/bulkhead-io/bulkhead/e2e/internal/report"
	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
)

// Shape is one way a noisy tenant misbehaves.
type Shape struct {
	// Name is the row's name in the matrix.
	Name string
	// Idle: the noisy tenant sends nothing (the baseline row).
	Idle bool
	// Destinations is how many destinations the noisy tenant has, and Mix
	// the behaviours of their endpoints, assigned in turn.
	Destinations int
	Mix          []fleet.Behavior
	// OneHost puts every noisy destination on one endpoint (one host).
	OneHost bool
	// Pause pauses the noisy destinations before the load.
	Pause bool
	// Rate is the noisy tenant's offered impressions per second, Batch its
	// impressions per Submit and Padding the bytes of properties of each
	// impression; Senders submit concurrently.
	Rate    float64
	Batch   int
	Padding int
	Senders int
}

// Shapes is the matrix, baseline first. rate is a tenant's allowed
// impressions per second at ingest (the flood row offers it all).
func Shapes(rate float64) []Shape {
	fail := []fleet.Behavior{fleet.Hang, fleet.Refused, fleet.Status503}
	quietLike := Shape{Rate: 1000, Batch: 100, Senders: 1}
	with := func(s Shape) Shape {
		if s.Rate == 0 {
			s.Rate, s.Batch, s.Senders = quietLike.Rate, quietLike.Batch, quietLike.Senders
		}
		if s.Destinations == 0 {
			s.Destinations = 1
		}
		return s
	}
	return []Shape{
		with(Shape{Name: "baseline", Idle: true}),
		with(Shape{Name: "hang-refused-503", Destinations: 30, Mix: fail}),
		with(Shape{Name: "fail-90pct", Destinations: 27, Mix: fail}),
		with(Shape{Name: "slow-2xx", Destinations: 64, Mix: []fleet.Behavior{fleet.SlowOK}}),
		with(Shape{Name: "retry-after-long", Destinations: 16, Mix: []fleet.Behavior{fleet.ThrottledLong}}),
		with(Shape{Name: "reject-4xx", Destinations: 16, Mix: []fleet.Behavior{fleet.Reject400}}),
		with(Shape{Name: "paused-until-full", Pause: true}),
		with(Shape{Name: "flood", Rate: rate, Batch: 1000, Senders: 8}),
		with(Shape{Name: "1000-dests-one-failing-host", Destinations: 1000, OneHost: true, Mix: []fleet.Behavior{fleet.Hang}}),
		with(Shape{Name: "max-size-batches", Rate: 2000, Batch: 1000, Padding: 900, Senders: 2}),
	}
}

// Options say where Bulkhead is and how the quiet tenants behave.
type Options struct {
	IngestAddr, AdminAddr string
	// AdminToken is an operator token.
	AdminToken string
	// Keys are API keys: the first Quiet are the quiet tenants', the next
	// the noisy tenant's; Tenants are their tenant ids, in the same order.
	Keys, Tenants []string
	// Quiet tenants each submit QuietBatch impressions every QuietEvery.
	Quiet      int
	QuietBatch int
	QuietEvery time.Duration
	// Measure is how long the load runs; Drain bounds the wait after it.
	Measure, Drain time.Duration
	// Timeout is every destination's request timeout; SlowDelay is how
	// long a slow-2xx endpoint takes (just under Timeout).
	Timeout, SlowDelay time.Duration
	// Prefix starts every destination id, so rows can share a Bulkhead.
	Prefix string
	Log    *slog.Logger
}

// Result is one row.
type Result struct {
	Shape string `json:"shape"`
	// Quiet tenants: end-to-end latency of their impressions, how many they
	// had accepted, lost (never arrived), duplicated, and refused.
	QuietP50      time.Duration `json:"quiet_p50_ns"`
	QuietP99      time.Duration `json:"quiet_p99_ns"`
	QuietAccepted int           `json:"quiet_accepted"`
	QuietLost     int           `json:"quiet_lost"`
	QuietDups     int           `json:"quiet_duplicates"`
	QuietRefused  int           `json:"quiet_refused"`
	// Noisy tenant: accepted impressions, deliveries and parked copies,
	// copies lost (accepted × destinations − delivered − parked) and
	// duplicated, and its refusals by reason (ErrorInfo reason, else code).
	NoisyAccepted  int            `json:"noisy_accepted"`
	NoisyDelivered int            `json:"noisy_delivered"`
	NoisyParked    int            `json:"noisy_parked"`
	NoisyLost      int            `json:"noisy_lost"`
	NoisyDups      int            `json:"noisy_duplicates"`
	NoisyRefused   map[string]int `json:"noisy_refused"`
}

// run is one row's state.
type run struct {
	o     Options
	s     Shape
	fl    *fleet.Fleet
	ing   ingestv1.IngestServiceClient
	adm   adminv1.AdminServiceClient
	dests []string // the noisy destinations

	mu        sync.Mutex
	submitted map[string]time.Time // quiet key → when it was submitted
	arrived   map[string]int       // quiet key → arrivals
	lat       report.Histogram
	noisyKeys map[string]bool // accepted
	noisyGot  map[string]int  // deliveries by key, all noisy destinations
	refused   map[string]int
	quietRef  int
}

// Run runs one row and returns it.
func Run(ctx context.Context, o Options, s Shape) (Result, error) {
	r := &run{o: o, s: s, submitted: map[string]time.Time{}, arrived: map[string]int{},
		noisyKeys: map[string]bool{}, noisyGot: map[string]int{}, refused: map[string]int{}}
	endpoints := o.Quiet + s.Destinations
	if s.OneHost {
		endpoints = o.Quiet + 1
	}
	var err error
	r.fl, err = fleet.New(endpoints, fleet.Options{SlowDelay: o.SlowDelay, OnArrival: r.arrival})
	if err != nil {
		return Result{}, err
	}
	defer r.fl.Close()
	conns, err := r.connect()
	if err != nil {
		return Result{}, err
	}
	defer func() {
		for _, c := range conns {
			_ = c.Close()
		}
	}()
	if err := r.setup(ctx); err != nil {
		return Result{}, err
	}

	lctx, stop := context.WithTimeout(ctx, o.Measure)
	var wg sync.WaitGroup
	for q := range o.Quiet {
		wg.Go(func() { r.quiet(lctx, q) })
	}
	if !s.Idle {
		for w := range s.Senders {
			wg.Go(func() { r.noisy(lctx, w) })
		}
	}
	wg.Wait()
	stop()
	if ctx.Err() != nil {
		return Result{}, ctx.Err()
	}
	r.heal(ctx)
	r.drain(ctx)
	return r.result(ctx)
}

func (r *run) connect() ([]*grpc.ClientConn, error) {
	ic, err := grpc.NewClient(r.o.IngestAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	ac, err := grpc.NewClient(r.o.AdminAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		_ = ic.Close()
		return nil, err
	}
	r.ing, r.adm = ingestv1.NewIngestServiceClient(ic), adminv1.NewAdminServiceClient(ac)
	return []*grpc.ClientConn{ic, ac}, nil
}

func (r *run) admin(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+r.o.AdminToken)
}

func (r *run) create(ctx context.Context, id, tenant string, endpoint int) error {
	_, err := r.adm.CreateDestination(r.admin(ctx), &adminv1.CreateDestinationRequest{Destination: &adminv1.Destination{
		Id: id, TenantId: tenant, Url: r.fl.URL(endpoint), Enabled: true,
		Linger: durationpb.New(50 * time.Millisecond), Timeout: durationpb.New(r.o.Timeout),
	}})
	if err != nil {
		return fmt.Errorf("create %s: %w", id, err)
	}
	return nil
}

// setup creates the destinations, sets the noisy endpoints' behaviours and
// pauses what the shape pauses.
func (r *run) setup(ctx context.Context) error {
	for q := range r.o.Quiet {
		if err := r.create(ctx, fmt.Sprintf("%sq%d", r.o.Prefix, q), r.o.Tenants[q], q); err != nil {
			return err
		}
	}
	noisy := r.o.Tenants[r.o.Quiet]
	for i := range r.s.Destinations {
		ep := r.o.Quiet + i
		if r.s.OneHost {
			ep = r.o.Quiet
		}
		id := fmt.Sprintf("%sn%d", r.o.Prefix, i)
		if err := r.create(ctx, id, noisy, ep); err != nil {
			return err
		}
		r.dests = append(r.dests, id)
		if len(r.s.Mix) > 0 && (!r.s.OneHost || i == 0) {
			if err := r.fl.Set(ep, r.s.Mix[i%len(r.s.Mix)]); err != nil {
				return err
			}
		}
		if r.s.Pause {
			if _, err := r.adm.PauseDestination(r.admin(ctx), &adminv1.PauseDestinationRequest{Id: id, Reason: "noisy matrix"}); err != nil {
				return err
			}
		}
	}
	return nil
}

// quiet submits tenant q's small batches every QuietEvery until ctx ends.
func (r *run) quiet(ctx context.Context, q int) {
	r.submitEvery(ctx, r.o.Keys[q], r.o.QuietEvery, fmt.Sprintf("q%d", q), r.o.QuietBatch, 0,
		func(at time.Time, req *ingestv1.SubmitRequest, err error) {
			if err != nil {
				r.quietRef++
				return
			}
			for _, imp := range req.GetImpressions() {
				r.submitted[imp.GetKey()] = at
			}
		})
}

// noisy is one of the noisy tenant's senders: Rate/Senders impressions a
// second in batches of Batch, until ctx ends, recording what was accepted
// and why anything was refused.
func (r *run) noisy(ctx context.Context, w int) {
	perSender := r.s.Rate / float64(r.s.Senders)
	every := time.Duration(float64(time.Second) * float64(r.s.Batch) / perSender)
	r.submitEvery(ctx, r.o.Keys[r.o.Quiet], every, fmt.Sprintf("n%d", w), r.s.Batch, r.s.Padding,
		func(_ time.Time, req *ingestv1.SubmitRequest, err error) {
			if err != nil {
				r.refused[reason(err)]++
				return
			}
			for _, imp := range req.GetImpressions() {
				r.noisyKeys[imp.GetKey()] = true
			}
		})
}

// submitEvery submits, every period until ctx ends, a batch of n
// impressions keyed "<prefix>-<seq>-<i>" (each padded with padding bytes
// of properties) with apiKey, and reports each Submit to record, with when
// it was sent, under r.mu.
func (r *run) submitEvery(ctx context.Context, apiKey string, every time.Duration, prefix string, n, padding int,
	record func(at time.Time, req *ingestv1.SubmitRequest, err error)) {
	t := time.NewTicker(every)
	defer t.Stop()
	key := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+apiKey)
	for seq := 0; ; seq++ {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		req := &ingestv1.SubmitRequest{IdempotencyKey: fmt.Sprintf("%s-%d", prefix, seq)}
		for j := range n {
			req.Impressions = append(req.Impressions, impression(fmt.Sprintf("%s-%d-%d", prefix, seq, j), padding))
		}
		at := time.Now()
		cctx, cancel := context.WithTimeout(key, 10*time.Second)
		_, err := r.ing.Submit(cctx, req)
		cancel()
		r.mu.Lock()
		record(at, req, err)
		r.mu.Unlock()
	}
}

// reason names a refusal: its ErrorInfo reason, else its gRPC code.
func reason(err error) string {
	st := status.Convert(err)
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info.GetReason()
		}
	}
	return st.Code().String()
}

func impression(key string, padding int) *ingestv1.Impression {
	imp := &ingestv1.Impression{Key: key, Split: "s", Treatment: "on", Time: time.Now().UnixMilli()}
	if padding > 0 {
		imp.Properties = `{"p":"` + strings.Repeat("x", padding) + `"}`
	}
	return imp
}

func (r *run) arrival(a fleet.Arrival) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, k := range a.Keys {
		if k[0] == 'q' {
			r.arrived[k]++
			if at, ok := r.submitted[k]; ok && r.arrived[k] == 1 {
				r.lat.Record(a.At.Sub(at))
			}
			continue
		}
		r.noisyGot[k]++
	}
}

// heal makes every noisy endpoint healthy and resumes paused destinations,
// so the noisy tenant's accepted impressions can drain (a 4xx-rejected
// batch stays parked).
func (r *run) heal(ctx context.Context) {
	for i := r.o.Quiet; i < r.fl.Len(); i++ {
		if r.fl.Behavior(i) != fleet.Reject400 {
			_ = r.fl.Set(i, fleet.Healthy)
		}
	}
	if r.s.Pause {
		for _, id := range r.dests {
			if _, err := r.adm.ResumeDestination(r.admin(ctx), &adminv1.ResumeDestinationRequest{Id: id, Reason: "noisy matrix: healed"}); err != nil {
				r.o.Log.Warn("resume", "destination", id, "err", err)
			}
		}
	}
}

// drain waits until the quiet tenants have everything and the noisy
// tenant's deliveries stop growing, at most Drain.
func (r *run) drain(ctx context.Context) {
	deadline := time.Now().Add(r.o.Drain)
	last, still := -1, 0
	for time.Now().Before(deadline) && ctx.Err() == nil {
		r.mu.Lock()
		quietDone := len(r.arrived) >= len(r.submitted)
		got := 0
		for _, n := range r.noisyGot {
			got += n
		}
		want := len(r.noisyKeys) * len(r.dests)
		r.mu.Unlock()
		if quietDone && (got >= want || r.s.Idle) {
			return
		}
		if got == last {
			still++
		} else {
			still, last = 0, got
		}
		// Rejected batches stay parked: stop once deliveries stand still
		// for 10 s with the quiet tenants done.
		if quietDone && still >= 20 {
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// parked counts the parked copies of the noisy tenant's keys.
func (r *run) parked(ctx context.Context) (map[string]int, error) {
	out := map[string]int{}
	for _, id := range r.dests {
		st, err := r.adm.ExportParked(r.admin(ctx), &adminv1.ExportParkedRequest{Id: id})
		if err != nil {
			return nil, fmt.Errorf("export %s: %w", id, err)
		}
		for {
			m, err := st.Recv()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return nil, fmt.Errorf("export %s: %w", id, err)
			}
			for _, imp := range m.GetImpressions() {
				out[imp.GetKey()]++
			}
		}
	}
	return out, nil
}

func (r *run) result(ctx context.Context) (Result, error) {
	parked, err := r.parked(ctx)
	if err != nil {
		return Result{}, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	res := Result{Shape: r.s.Name, QuietP50: r.lat.Quantile(0.5), QuietP99: r.lat.Quantile(0.99),
		QuietAccepted: len(r.submitted), QuietRefused: r.quietRef, NoisyAccepted: len(r.noisyKeys), NoisyRefused: r.refused}
	for k := range r.submitted {
		switch n := r.arrived[k]; {
		case n == 0:
			res.QuietLost++
		case n > 1:
			res.QuietDups += n - 1
		}
	}
	copies := len(r.dests)
	for k := range r.noisyKeys {
		got, p := r.noisyGot[k], parked[k]
		res.NoisyDelivered += got
		res.NoisyParked += p
		if got+p < copies {
			res.NoisyLost += copies - got - p
		} else {
			res.NoisyDups += got + p - copies
		}
	}
	return res, nil
}

// Line is the row as make bench-noisy prints it; ratio is against the
// baseline row's quiet p99.
func (res Result) Line(baselineP99 time.Duration) string {
	ratio := 0.0
	if baselineP99 > 0 {
		ratio = float64(res.QuietP99) / float64(baselineP99)
	}
	var refused []string
	for _, k := range slices.Sorted(maps.Keys(res.NoisyRefused)) {
		refused = append(refused, fmt.Sprintf("%s:%d", k, res.NoisyRefused[k]))
	}
	ref := strings.Join(refused, ",")
	if ref == "" {
		ref = "none"
	}
	return fmt.Sprintf("noisy: shape=%s quiet_p99_ratio=%.2f lost=%d duplicates=%d quiet_p99_ms=%.0f quiet_refused=%d noisy_accepted=%d noisy_delivered=%d noisy_parked=%d noisy_refused=%s",
		res.Shape, ratio, res.QuietLost+res.NoisyLost, res.QuietDups+res.NoisyDups, float64(res.QuietP99)/1e6, res.QuietRefused,
		res.NoisyAccepted, res.NoisyDelivered, res.NoisyParked, ref)
}
