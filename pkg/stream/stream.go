// Package stream declares Bulkhead's JetStream streams and KV buckets and
// creates them idempotently, with explicit limits and "discard new" so a full
// stream refuses producers instead of dropping accepted data. One service
// owns their configuration (Ensure); the others wait for them (Await), so no
// service can shrink a stream by starting with other flags.
package stream

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/bulkhead-io/bulkhead/pkg/lifecycle"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

// Limits size the streams. Zero values take the defaults of DefaultLimits.
type Limits struct {
	// Replicas of every stream and bucket (1 embedded, 3 in a cluster).
	Replicas int
	// ImpressionsMaxBytes bounds accepted-but-unrouted impressions.
	ImpressionsMaxBytes int64
	// DeliveryMaxBytes bounds routed-but-undelivered batches.
	DeliveryMaxBytes int64
	// ParkedMaxBytes bounds parked batches.
	ParkedMaxBytes int64
	// ParkedMaxAge is the export window: parked batches are kept this long.
	ParkedMaxAge time.Duration
	// OutcomesMaxAge keeps delivery outcomes just long enough for the monitor.
	OutcomesMaxAge time.Duration
	// AuditMaxAge keeps decisions and admin actions.
	AuditMaxAge time.Duration
	// DedupWindow is how long an idempotency key is remembered by ingest.
	DedupWindow time.Duration
	// MaxConsumers on DELIVERY: one durable consumer per destination.
	MaxConsumers int
	// TenantBacklog bounds one tenant's batches in IMPRESSIONS (accepted,
	// not yet routed). JetStream refuses the tenant's next batch beyond it,
	// and ingest answers ResourceExhausted; other tenants are not affected.
	TenantBacklog int64
	// DestinationBacklog bounds one destination's batches in DELIVERY
	// (routed, not yet delivered). Beyond it JetStream refuses the
	// destination's next batch and the router parks it instead
	// (parked.OverBudget), so a slow destination grows PARKED, not DELIVERY.
	DestinationBacklog int64
	// DestinationParked bounds one destination's batches in PARKED. The
	// monitor refuses the destination's tenant at ingest before it is
	// reached; the limit is the backstop when the monitor is not running.
	DestinationParked int64
	// AllowShrink lets Ensure lower a stream's MaxBytes or MaxAge. Without
	// it Ensure refuses (ErrShrink): a smaller MaxAge deletes older data at
	// once, a smaller MaxBytes makes producers stall.
	AllowShrink bool
}

// ErrShrink is returned by Ensure when the stored configuration of a stream
// keeps more (bytes or age) than the one asked for and AllowShrink is off.
var ErrShrink = errors.New("would shrink a stream")

// DefaultLimits are sized for one machine.
func DefaultLimits() Limits {
	return Limits{
		Replicas:            1,
		ImpressionsMaxBytes: 2 << 30,
		DeliveryMaxBytes:    4 << 30,
		ParkedMaxBytes:      8 << 30,
		ParkedMaxAge:        7 * 24 * time.Hour,
		OutcomesMaxAge:      10 * time.Minute,
		AuditMaxAge:         90 * 24 * time.Hour,
		DedupWindow:         time.Hour,
		MaxConsumers:        10000,
		TenantBacklog:       5000,
		DestinationBacklog:  10000,
		DestinationParked:   200000,
	}
}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits()
	if l.Replicas == 0 {
		l.Replicas = d.Replicas
	}
	if l.ImpressionsMaxBytes == 0 {
		l.ImpressionsMaxBytes = d.ImpressionsMaxBytes
	}
	if l.DeliveryMaxBytes == 0 {
		l.DeliveryMaxBytes = d.DeliveryMaxBytes
	}
	if l.ParkedMaxBytes == 0 {
		l.ParkedMaxBytes = d.ParkedMaxBytes
	}
	if l.ParkedMaxAge == 0 {
		l.ParkedMaxAge = d.ParkedMaxAge
	}
	if l.OutcomesMaxAge == 0 {
		l.OutcomesMaxAge = d.OutcomesMaxAge
	}
	if l.AuditMaxAge == 0 {
		l.AuditMaxAge = d.AuditMaxAge
	}
	if l.DedupWindow == 0 {
		l.DedupWindow = d.DedupWindow
	}
	if l.MaxConsumers == 0 {
		l.MaxConsumers = d.MaxConsumers
	}
	if l.TenantBacklog == 0 {
		l.TenantBacklog = d.TenantBacklog
	}
	if l.DestinationBacklog == 0 {
		l.DestinationBacklog = d.DestinationBacklog
	}
	if l.DestinationParked == 0 {
		l.DestinationParked = d.DestinationParked
	}
	return l
}

// Streams returns the stream configurations for l.
func Streams(l Limits) []jetstream.StreamConfig {
	l = l.withDefaults()
	return []jetstream.StreamConfig{
		{
			Name:        topology.StreamImpressions,
			Description: "accepted impressions, not yet routed",
			Subjects:    []string{topology.AllIn},
			Retention:   jetstream.WorkQueuePolicy,
			Discard:     jetstream.DiscardNew,
			MaxBytes:    l.ImpressionsMaxBytes,
			// One subject per tenant: its share of the stream.
			MaxMsgsPerSubject:    l.TenantBacklog,
			DiscardNewPerSubject: true,
			Duplicates:           l.DedupWindow,
			Storage:              jetstream.FileStorage,
			Replicas:             l.Replicas,
		},
		{
			Name:        topology.StreamDelivery,
			Description: "routed batches, not yet delivered",
			Subjects:    []string{topology.AllDeliver},
			Retention:   jetstream.WorkQueuePolicy,
			Discard:     jetstream.DiscardNew,
			MaxBytes:    l.DeliveryMaxBytes,
			// One subject per destination: its share of the stream.
			MaxMsgsPerSubject:    l.DestinationBacklog,
			DiscardNewPerSubject: true,
			Duplicates:           5 * time.Minute,
			MaxConsumers:         l.MaxConsumers,
			Storage:              jetstream.FileStorage,
			Replicas:             l.Replicas,
		},
		{
			Name:                 topology.StreamParked,
			Description:          "quarantined, paused and undeliverable batches; replay and export source",
			Subjects:             []string{topology.AllParked},
			Retention:            jetstream.LimitsPolicy,
			Discard:              jetstream.DiscardNew,
			MaxBytes:             l.ParkedMaxBytes,
			MaxAge:               l.ParkedMaxAge,
			MaxMsgsPerSubject:    l.DestinationParked,
			DiscardNewPerSubject: true,
			Duplicates:           5 * time.Minute,
			Storage:              jetstream.FileStorage,
			Replicas:             l.Replicas,
		},
		{
			Name:        topology.StreamOutcomes,
			Description: "every delivery attempt; the health signal",
			Subjects:    []string{topology.AllOutcomes},
			Retention:   jetstream.LimitsPolicy,
			// Outcomes are a signal, not data: when full, the oldest go.
			Discard:  jetstream.DiscardOld,
			MaxBytes: 512 << 20,
			MaxAge:   l.OutcomesMaxAge,
			Storage:  jetstream.FileStorage,
			Replicas: l.Replicas,
		},
		{
			Name:        topology.StreamAudit,
			Description: "decisions and admin actions",
			Subjects:    []string{topology.AllAudit},
			Retention:   jetstream.LimitsPolicy,
			Discard:     jetstream.DiscardNew,
			MaxBytes:    1 << 30,
			MaxAge:      l.AuditMaxAge,
			Storage:     jetstream.FileStorage,
			Replicas:    l.Replicas,
		},
	}
}

// Every long-lived pull subscription (the router's, each delivery lane's)
// uses these: a pull request lives PullExpiry and the server sends an idle
// heartbeat every PullHeartbeat, so a pull the server dropped (a consumer
// leader change, a pull sent while the consumer had no leader) is noticed
// after two missed heartbeats and sent again, within seconds rather than
// never. Callers must block in Next for the check to run.
const (
	PullExpiry    = 10 * time.Second
	PullHeartbeat = 2 * time.Second
)

// Shares is what a stream holds, in all and on each tenant's or
// destination's subject.
type Shares struct {
	// ByID counts the messages on each subject matching the filter, by the
	// id that ends it (a destination or tenant); subjects holding none are
	// left out.
	ByID map[string]int64
	// FirstSeq is the stream's first sequence, where a search by subject starts.
	FirstSeq uint64
	// Bytes and MaxBytes are the stream's size and limit.
	Bytes    uint64
	MaxBytes int64
	// PerSubjectLimit is the stream's MaxMsgsPerSubject: one share's budget
	// (0 or less: none).
	PerSubjectLimit int64
}

// Fill is the fraction of its MaxBytes the stream holds (0 without a limit).
func (s Shares) Fill() float64 {
	if s.MaxBytes <= 0 {
		return 0
	}
	return float64(s.Bytes) / float64(s.MaxBytes)
}

// PerSubject returns what s holds on each subject matching filter
// (imp.deliver.>, imp.parked.> or imp.in.>): one stream-info request,
// however many destinations there are.
func PerSubject(ctx context.Context, s jetstream.Stream, filter string) (Shares, error) {
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(filter))
	if err != nil {
		return Shares{}, err
	}
	out := Shares{
		ByID:     make(map[string]int64, len(info.State.Subjects)),
		FirstSeq: info.State.FirstSeq, Bytes: info.State.Bytes, MaxBytes: info.Config.MaxBytes,
		PerSubjectLimit: info.Config.MaxMsgsPerSubject,
	}
	for subj, n := range info.State.Subjects {
		if id, err := topology.IDFrom(subj); err == nil && n > 0 {
			out.ByID[id] = int64(n)
		}
	}
	return out, nil
}

// EnvelopeReserve is what a batch may grow by between Submit and PARKED:
// its id, tenant and timestamps when stored, its destination when routed,
// its park reason (at most MaxParkReason bytes), attempts and headers when
// parked.
const EnvelopeReserve = 64 << 10

// MaxBatchBytes is the largest Submit a NATS server with maxPayload stores,
// routes and parks as one message. Ingest refuses larger ones with a
// permanent InvalidArgument: a batch accepted over it could be stored but
// not parked, and would be retried forever.
func MaxBatchBytes(maxPayload int64) int { return int(maxPayload - EnvelopeReserve) }

// LeaseTTL is how long the monitor's leadership lease lives without renewal.
const LeaseTTL = 6 * time.Second

// Buckets returns the KV bucket configurations for l.
func Buckets(l Limits) []jetstream.KeyValueConfig {
	l = l.withDefaults()
	return []jetstream.KeyValueConfig{
		{Bucket: topology.BucketDestinations, Description: "destination registry", History: 10, Storage: jetstream.FileStorage, Replicas: l.Replicas},
		{Bucket: topology.BucketQuarantine, Description: "decisions the routers and deliverers enforce", History: 20, Storage: jetstream.FileStorage, Replicas: l.Replicas},
		{Bucket: topology.BucketAdmission, Description: "tenants ingest refuses because a budget is spent", History: 5, Storage: jetstream.FileStorage, Replicas: l.Replicas},
		{Bucket: topology.BucketLeases, Description: "leadership leases", History: 1, TTL: LeaseTTL, Storage: jetstream.FileStorage, Replicas: l.Replicas},
	}
}

// Ensure creates every stream and bucket that does not exist and updates
// streams whose limits differ from l. It is safe to call from every replica
// of every service at start-up: it reads first and writes only what is
// missing or different, because concurrent create-or-update calls for the
// same stream stall on a fresh clustered JetStream (deploy/README.md).
func Ensure(ctx context.Context, js jetstream.JetStream, l Limits) error {
	for _, cfg := range Streams(l) {
		if err := retry(ctx, func(ctx context.Context) error { return ensureStream(ctx, js, cfg, l.AllowShrink) }); err != nil {
			return fmt.Errorf("ensure stream %s: %w", cfg.Name, err)
		}
	}
	for _, cfg := range Buckets(l) {
		if err := retry(ctx, func(ctx context.Context) error { return ensureBucket(ctx, js, cfg) }); err != nil {
			return fmt.Errorf("ensure bucket %s: %w", cfg.Bucket, err)
		}
	}
	return nil
}

func ensureStream(ctx context.Context, js jetstream.JetStream, cfg jetstream.StreamConfig, allowShrink bool) error {
	s, err := js.Stream(ctx, cfg.Name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		_, err = js.CreateStream(ctx, cfg)
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			return errRace // another replica created it first: read it again
		}
		return err
	}
	if err != nil {
		return err
	}
	have := s.CachedInfo().Config
	if same(have, cfg) {
		return nil
	}
	if err := shrinks(have, cfg); err != nil && !allowShrink {
		return permanent{err}
	}
	if err := overfull(ctx, s, have, cfg); err != nil && !allowShrink {
		return permanent{err}
	}
	_, err = js.UpdateStream(ctx, cfg)
	return err
}

// shrinks reports how want keeps less than have: a lower MaxBytes or MaxAge
// (0 meaning unlimited).
func shrinks(have, want jetstream.StreamConfig) error {
	lower := func(h, w int64) bool { return w > 0 && (h <= 0 || w < h) }
	switch {
	case lower(have.MaxBytes, want.MaxBytes):
		return fmt.Errorf("%s max bytes %d -> %d: %w", want.Name, have.MaxBytes, want.MaxBytes, ErrShrink)
	case lower(int64(have.MaxAge), int64(want.MaxAge)):
		return fmt.Errorf("%s max age %v -> %v: %w", want.Name, have.MaxAge, want.MaxAge, ErrShrink)
	}
	return nil
}

// overfull reports, when want lowers the per-subject limit, a subject of
// s holding more than the new limit: JetStream would delete its oldest
// messages to fit. A lower limit every subject already fits in is no
// shrink (enabling budgets on an existing deployment, say).
func overfull(ctx context.Context, s jetstream.Stream, have, want jetstream.StreamConfig) error {
	if want.MaxMsgsPerSubject <= 0 || (have.MaxMsgsPerSubject > 0 && have.MaxMsgsPerSubject <= want.MaxMsgsPerSubject) {
		return nil
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(">"))
	if err != nil {
		return err
	}
	for subj, n := range info.State.Subjects {
		if int64(n) > want.MaxMsgsPerSubject {
			return fmt.Errorf("%s max messages per subject -> %d, but %s holds %d: %w", want.Name, want.MaxMsgsPerSubject, subj, n, ErrShrink)
		}
	}
	return nil
}

// same reports whether the stored configuration already has what Streams sets.
func same(have, want jetstream.StreamConfig) bool {
	return slices.Equal(have.Subjects, want.Subjects) && have.Retention == want.Retention &&
		have.Discard == want.Discard && have.MaxBytes == want.MaxBytes && have.MaxAge == want.MaxAge &&
		have.Duplicates == want.Duplicates && have.MaxConsumers == want.MaxConsumers &&
		have.MaxMsgsPerSubject == want.MaxMsgsPerSubject && have.DiscardNewPerSubject == want.DiscardNewPerSubject &&
		have.Replicas == want.Replicas && have.Storage == want.Storage && have.Description == want.Description
}

func ensureBucket(ctx context.Context, js jetstream.JetStream, cfg jetstream.KeyValueConfig) error {
	_, err := js.KeyValue(ctx, cfg.Bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		_, err = js.CreateKeyValue(ctx, cfg)
		if errors.Is(err, jetstream.ErrBucketExists) || errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			return errRace
		}
	}
	return err
}

// errRace means another replica created the same stream or bucket first.
var errRace = errors.New("created concurrently")

// permanent marks an error retry must not retry.
type permanent struct{ error }

func (p permanent) Unwrap() error { return p.error }

// retry runs op with a short deadline per attempt until it succeeds, fails
// permanently or ctx ends: a clustered JetStream may be electing leaders
// when services start.
func retry(ctx context.Context, op func(context.Context) error) error {
	var err error
	for attempt := 0; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err = op(actx)
		cancel()
		var p permanent
		if err == nil {
			return nil
		}
		if errors.As(err, &p) {
			return p.error
		}
		if !lifecycle.Sleep(ctx, lifecycle.Backoff(attempt, 100*time.Millisecond, 2*time.Second)) {
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
		}
	}
}

// Await returns once every stream and bucket exists, as created by the
// service that owns them (Ensure), or when ctx ends. Services that do not
// own the configuration call it instead of Ensure, so they never change it;
// waiting logs through waiting every so often.
func Await(ctx context.Context, js jetstream.JetStream, waiting func(missing string)) error {
	var names []string
	for _, cfg := range Streams(Limits{}) {
		names = append(names, cfg.Name)
	}
	for _, b := range Buckets(Limits{}) {
		names = append(names, "KV_"+b.Bucket)
	}
	last := time.Time{}
	for _, name := range names {
		err := retry(ctx, func(ctx context.Context) error {
			_, err := js.Stream(ctx, name)
			if err != nil && waiting != nil && time.Since(last) > 5*time.Second {
				last = time.Now()
				waiting(name)
			}
			return err
		})
		if err != nil {
			return fmt.Errorf("await stream %s: %w", name, err)
		}
	}
	return nil
}

// IsFull reports whether err is JetStream refusing a message because a
// stream with "discard new" reached its limits. Callers must back off and
// refuse upstream; the message was not stored.
func IsFull(err error) bool {
	if IsSubjectFull(err) {
		return false
	}
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		// 10077 is JSStreamStoreFailedF, which carries "maximum bytes/messages exceeded".
		return apiErr.ErrorCode == 10077 || apiErr.Code == 503 && containsLimit(apiErr.Description)
	}
	return containsLimit(err.Error())
}

// IsSubjectFull reports whether err is JetStream refusing a message because
// its subject holds the stream's MaxMsgsPerSubject: one tenant's or one
// destination's share is spent, not the stream.
func IsSubjectFull(err error) bool {
	return err != nil && strings.Contains(err.Error(), "maximum messages per subject exceeded")
}

func containsLimit(s string) bool {
	return strings.Contains(s, "maximum bytes exceeded") || strings.Contains(s, "maximum messages exceeded")
}
