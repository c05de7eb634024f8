// Package parked reads, replays, exports and purges the PARKED stream, where a
// destination's batches wait while it is quarantined or paused, or after they
// could not be delivered. Parked data is kept for the export window.
package parked

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/time/rate"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

// MaxParkReason bounds the stored park reason (an endpoint's error text can
// be long), so a parked batch stays within stream.EnvelopeReserve of what
// was submitted.
const MaxParkReason = 1024

// truncate shortens s to at most n bytes, on a rune boundary.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// Park stores b in PARKED for its destination with the reason. msgID makes a
// repeated park of the same batch (after a crash between park and ack) a
// no-op within the stream's duplicate window.
func Park(ctx context.Context, js jetstream.JetStream, b *eventv1.Batch, reason Reason, attempts int32, msgID string) error {
	m, err := NewMsg(b, reason, attempts, msgID)
	if err != nil {
		return err
	}
	if _, err := js.PublishMsg(ctx, m); err != nil {
		return fmt.Errorf("park %s: %w", m.Subject, err)
	}
	return nil
}

// NewMsg builds the PARKED message for b (whose DestinationId must be set)
// and leaves b as it was; for callers that publish asynchronously. It sets
// the park fields only while marshalling rather than cloning b: a parked batch
// carries up to a thousand impressions, and a quarantined destination's whole
// traffic comes through here.
func NewMsg(b *eventv1.Batch, reason Reason, attempts int32, msgID string) (*nats.Msg, error) {
	subj, err := topology.Parked(b.GetDestinationId())
	if err != nil {
		return nil, err
	}
	oldReason, oldAttempts, oldAt := b.ParkReason, b.Attempts, b.ParkedAt
	b.ParkReason, b.Attempts, b.ParkedAt = truncate(reason.String(), MaxParkReason), attempts, timestamppb.Now()
	data, err := proto.Marshal(b)
	b.ParkReason, b.Attempts, b.ParkedAt = oldReason, oldAttempts, oldAt
	if err != nil {
		return nil, err
	}
	m := nats.NewMsg(subj)
	m.Data = data
	m.Header.Set(jetstream.MsgIDHeader, msgID)
	return m, nil
}

// ReplayIDPrefix starts the message id of every batch Replay puts back in
// DELIVERY (then its PARKED sequence): the deliverer tells replayed
// batches from fresh ones by it, to keep them to their share of workers.
const ReplayIDPrefix = "replay-"

// IsReplay reports whether msgID is that of a replayed batch.
func IsReplay(msgID string) bool { return strings.HasPrefix(msgID, ReplayIDPrefix) }

// ReplayGrace is how long after a destination starts RECOVERING its replay
// begins. Routers enforce a decision within a second; waiting longer than that
// means every batch a lagging router parked before it saw the decision is
// still covered by the replay. The monitor counts a destination drained once
// its oldest parked batch is younger than the decision plus this grace.
const ReplayGrace = 2 * time.Second

// Range selects parked batches by the time they were stored; zero ends are open.
type Range struct {
	Start, End time.Time
}

func (r Range) contains(t time.Time) bool {
	return (r.Start.IsZero() || !t.Before(r.Start)) && (r.End.IsZero() || t.Before(r.End))
}

// Msg is one parked batch.
type Msg struct {
	Seq    uint64
	Stored time.Time
	Batch  *eventv1.Batch
}

// Each calls fn for every parked batch of dest in r with a sequence ≤ upTo
// (0: no bound), oldest first, until fn returns an error. It reads message by
// message (no consumer state), so it is safe to run anywhere, any number of times.
func Each(ctx context.Context, js jetstream.JetStream, dest string, r Range, upTo uint64, fn func(Msg) error) error {
	s, err := parkedStream(ctx, js)
	if err != nil {
		return err
	}
	return each(ctx, s, dest, r, upTo, fn)
}

// parkedStream looks PARKED up: one request, so callers that go on to read or
// delete many messages do it once.
func parkedStream(ctx context.Context, js jetstream.JetStream) (jetstream.Stream, error) {
	s, err := js.Stream(ctx, topology.StreamParked)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", topology.StreamParked, err)
	}
	return s, nil
}

func each(ctx context.Context, s jetstream.Stream, dest string, r Range, upTo uint64, fn func(Msg) error) error {
	subj, err := topology.Parked(dest)
	if err != nil {
		return err
	}
	seq := uint64(1)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		raw, err := s.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(subj))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("get %s from %d: %w", subj, seq, err)
		}
		if upTo > 0 && raw.Sequence > upTo {
			return nil
		}
		seq = raw.Sequence + 1
		if !r.contains(raw.Time) {
			continue
		}
		var b eventv1.Batch
		if err := proto.Unmarshal(raw.Data, &b); err != nil {
			return fmt.Errorf("decode %s seq %d: %w", subj, raw.Sequence, err)
		}
		if err := fn(Msg{Seq: raw.Sequence, Stored: raw.Time, Batch: &b}); err != nil {
			return err
		}
	}
}

// Stats returns how many batches of dest are parked and when the oldest was stored.
func Stats(ctx context.Context, js jetstream.JetStream, dest string) (int64, time.Time, error) {
	subj, err := topology.Parked(dest)
	if err != nil {
		return 0, time.Time{}, err
	}
	s, err := parkedStream(ctx, js)
	if err != nil {
		return 0, time.Time{}, err
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(subj))
	if err != nil {
		return 0, time.Time{}, err
	}
	n := int64(info.State.Subjects[subj])
	if n == 0 {
		return 0, time.Time{}, nil
	}
	raw, err := s.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(subj))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return 0, time.Time{}, nil
	}
	if err != nil {
		return 0, time.Time{}, err
	}
	return n, raw.Time, nil
}

// LastSeq is the PARKED stream's last sequence: a replay bound, so batches
// parked again during a replay are not replayed in a loop.
func LastSeq(ctx context.Context, js jetstream.JetStream) (uint64, error) {
	s, err := parkedStream(ctx, js)
	if err != nil {
		return 0, err
	}
	return lastSeq(ctx, s)
}

func lastSeq(ctx context.Context, s jetstream.Stream) (uint64, error) {
	info, err := s.Info(ctx)
	if err != nil {
		return 0, err
	}
	return info.State.LastSeq, nil
}

// Delete removes one parked batch (after it was delivered or replayed).
func Delete(ctx context.Context, js jetstream.JetStream, seq uint64) error {
	s, err := parkedStream(ctx, js)
	if err != nil {
		return err
	}
	return deleteMsg(ctx, s, seq)
}

func deleteMsg(ctx context.Context, s jetstream.Stream, seq uint64) error {
	err := s.DeleteMsg(ctx, seq)
	// Another replica replayed it first; it is gone either way. The server
	// answers a delete of a missing message with "no message found" (10057),
	// which the client reports as ErrMsgDeleteUnsuccessful with the
	// description as text only.
	if errors.Is(err, jetstream.ErrMsgNotFound) ||
		errors.Is(err, jetstream.ErrMsgDeleteUnsuccessful) && strings.Contains(err.Error(), "no message found") {
		return nil
	}
	return err
}

// Purge deletes the parked batches of dest in r and returns how many; with
// dryRun it only counts.
func Purge(ctx context.Context, js jetstream.JetStream, dest string, r Range, dryRun bool) (int64, error) {
	s, err := parkedStream(ctx, js)
	if err != nil {
		return 0, err
	}
	var n int64
	err = each(ctx, s, dest, r, 0, func(m Msg) error {
		n++
		if dryRun {
			return nil
		}
		return deleteMsg(ctx, s, m.Seq)
	})
	return n, err
}

// ReplayOptions shape a replay.
type ReplayOptions struct {
	// Range selects batches by store time.
	Range Range
	// UpTo bounds the sequences replayed (0: the stream's last sequence at start).
	UpTo uint64
	// Rate is the starting rate in batches per second.
	Rate float64
	// MaxRate is where the ramp stops; the rate doubles every RampEvery.
	MaxRate float64
	// RampEvery is the doubling interval (0: no ramp).
	RampEvery time.Duration
	// Continue is asked before each batch; replay stops when it says false
	// (the destination failed again, or was paused).
	Continue func() bool
	// Shared, when set, is a budget every replay of this process waits on as
	// well, so many destinations recovering at once cannot flood delivery.
	Shared *rate.Limiter
	// Only, when set, picks the batches to move; the others stay parked.
	Only func(*eventv1.Batch) bool
}

// Replay moves parked batches of dest back to imp.deliver.<dest>, oldest first,
// at a bounded, ramped rate. Each batch is deleted from PARKED only after
// DELIVERY stored it; a crash in between replays it again under the same
// message id, which DELIVERY de-duplicates. It returns batches and
// impressions moved.
func Replay(ctx context.Context, js jetstream.JetStream, dest string, o ReplayOptions) (int64, int64, error) {
	deliverSubj, err := topology.Deliver(dest)
	if err != nil {
		return 0, 0, err
	}
	if o.Rate <= 0 {
		o.Rate = 100
	}
	if o.MaxRate < o.Rate {
		o.MaxRate = o.Rate
	}
	s, err := parkedStream(ctx, js)
	if err != nil {
		return 0, 0, err
	}
	if o.UpTo == 0 {
		if o.UpTo, err = lastSeq(ctx, s); err != nil {
			return 0, 0, err
		}
		if o.UpTo == 0 {
			return 0, 0, nil // PARKED is empty; 0 would mean "no bound" to Each
		}
	}
	lim := rate.NewLimiter(rate.Limit(o.Rate), 1)
	nextRamp := time.Now().Add(o.RampEvery)
	var batches, imps int64
	err = each(ctx, s, dest, o.Range, o.UpTo, func(m Msg) error {
		if o.Continue != nil && !o.Continue() {
			return errStop
		}
		if o.Only != nil && !o.Only(m.Batch) {
			return nil
		}
		if o.RampEvery > 0 && time.Now().After(nextRamp) && float64(lim.Limit()) < o.MaxRate {
			lim.SetLimit(min(lim.Limit()*2, rate.Limit(o.MaxRate)))
			nextRamp = time.Now().Add(o.RampEvery)
		}
		if err := lim.Wait(ctx); err != nil {
			return err
		}
		if o.Shared != nil {
			if err := o.Shared.Wait(ctx); err != nil {
				return err
			}
		}
		b := m.Batch
		b.ParkReason, b.ParkedAt, b.Attempts = "", nil, 0
		data, err := proto.Marshal(b)
		if err != nil {
			return err
		}
		out := nats.NewMsg(deliverSubj)
		out.Data = data
		out.Header.Set(jetstream.MsgIDHeader, ReplayIDPrefix+strconv.FormatUint(m.Seq, 10))
		if _, err := js.PublishMsg(ctx, out); err != nil {
			return fmt.Errorf("replay to %s: %w", deliverSubj, err)
		}
		if err := deleteMsg(ctx, s, m.Seq); err != nil {
			return fmt.Errorf("delete parked %d: %w", m.Seq, err)
		}
		batches++
		imps += int64(len(b.GetImpressions()))
		return nil
	})
	if errors.Is(err, errStop) {
		err = nil
	}
	return batches, imps, err
}

var errStop = errors.New("replay stopped")

// Backlog is one destination's parked batches.
type Backlog struct {
	Batches int64
	Oldest  time.Time // when the oldest was stored
}

// Summary returns every destination's parked backlog: one stream-info
// request for the counts, then one read per destination for its oldest.
func Summary(ctx context.Context, js jetstream.JetStream) (map[string]Backlog, error) {
	s, err := parkedStream(ctx, js)
	if err != nil {
		return nil, err
	}
	sh, err := stream.PerSubject(ctx, s, topology.AllParked)
	if err != nil {
		return nil, err
	}
	first := sh.FirstSeq
	out := make(map[string]Backlog, len(sh.ByID))
	for id, n := range sh.ByID {
		b := Backlog{Batches: n}
		subj, _ := topology.Parked(id) // valid: IDFrom checked it
		if raw, err := s.GetMsg(ctx, first, jetstream.WithGetMsgSubject(subj)); err == nil {
			b.Oldest = raw.Time
		}
		out[id] = b
	}
	return out, nil
}
