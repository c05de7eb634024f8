package parked

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/testkit"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func setup(t *testing.T) (jetstream.JetStream, context.Context) {
	t.Helper()
	js := testkit.JetStream(t, stream.Limits{}).JS
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return js, ctx
}

func batch(dest, id string, n int) *eventv1.Batch {
	return testkit.Batch(id, dest, testkit.Impressions("user", n))
}

// park parks n batches of two impressions for dest, named <prefix>0.., and
// returns their ids in order.
func park(t *testing.T, ctx context.Context, js jetstream.JetStream, dest, prefix string, n int) []string {
	t.Helper()
	var out []string
	for i := range n {
		id := prefix + strconv.Itoa(i)
		if err := Park(ctx, js, batch(dest, id, 2), Reason{Class: Quarantined}, 3, "park-"+dest+"-"+id); err != nil {
			t.Fatalf("Park %s: %v", id, err)
		}
		out = append(out, id)
	}
	return out
}

func collect(t *testing.T, ctx context.Context, js jetstream.JetStream, dest string, r Range, upTo uint64) []Msg {
	t.Helper()
	var out []Msg
	if err := Each(ctx, js, dest, r, upTo, func(m Msg) error {
		out = append(out, m)
		return nil
	}); err != nil {
		t.Fatalf("Each %s: %v", dest, err)
	}
	return out
}

func batchIDs(ms []Msg) []string {
	out := make([]string, 0, len(ms))
	for _, m := range ms {
		out = append(out, m.Batch.GetBatchId())
	}
	return out
}

func TestParkStoresReasonAndDedupes(t *testing.T) {
	js, ctx := setup(t)
	b := batch("d1", "b1", 3)
	for range 2 {
		// A repeated park (crash between park and ack) is stored once.
		if err := Park(ctx, js, b, Because(Rejected, "HTTP 400"), 4, "same-id"); err != nil {
			t.Fatal(err)
		}
	}
	if b.GetParkReason() != "" || b.GetParkedAt() != nil {
		t.Error("Park changed its argument")
	}
	ms := collect(t, ctx, js, "d1", Range{}, 0)
	if len(ms) != 1 {
		t.Fatalf("parked %d batches, want 1", len(ms))
	}
	got := ms[0].Batch
	if got.GetParkReason() != "HTTP 400" || got.GetAttempts() != 4 || got.GetParkedAt() == nil || len(got.GetImpressions()) != 3 {
		t.Errorf("parked batch = %v", got)
	}
	if err := Park(ctx, js, batch("a.b", "b2", 1), Reason{Class: Paused}, 0, "id2"); !errors.Is(err, topology.ErrInvalidID) {
		t.Errorf("Park with invalid destination: %v, want ErrInvalidID", err)
	}
}

func TestEachOldestFirstWithRangeAndBound(t *testing.T) {
	js, ctx := setup(t)
	// Interleave two destinations so Each must filter by topology.
	var want []string
	for i := range 5 {
		want = append(want, park(t, ctx, js, "d1", "a"+strconv.Itoa(i)+"-", 1)...)
		park(t, ctx, js, "d2", "x"+strconv.Itoa(i)+"-", 1)
	}
	all := collect(t, ctx, js, "d1", Range{}, 0)
	if got := batchIDs(all); !slices.Equal(got, want) {
		t.Fatalf("Each(d1) = %v, want %v", got, want)
	}
	for i := 1; i < len(all); i++ {
		if all[i].Seq <= all[i-1].Seq || all[i].Stored.Before(all[i-1].Stored) {
			t.Fatalf("not oldest first: %+v then %+v", all[i-1], all[i])
		}
	}
	if got := len(collect(t, ctx, js, "d2", Range{}, 0)); got != 5 {
		t.Errorf("Each(d2) saw %d, want 5", got)
	}
	if got := collect(t, ctx, js, "nobody", Range{}, 0); len(got) != 0 {
		t.Errorf("Each(nobody) = %v", batchIDs(got))
	}

	for _, tc := range []struct {
		name string
		r    Range
		upTo uint64
		want []string
	}{
		{"start inclusive", Range{Start: all[2].Stored}, 0, want[2:]},
		{"end exclusive", Range{End: all[2].Stored}, 0, want[:2]},
		{"both", Range{Start: all[1].Stored, End: all[4].Stored}, 0, want[1:4]},
		{"upTo inclusive", Range{}, all[2].Seq, want[:3]},
		{"upTo between own messages", Range{}, all[2].Seq + 1, want[:3]},
		{"upTo and range", Range{Start: all[1].Stored}, all[3].Seq, want[1:4]},
		{"empty range", Range{Start: all[4].Stored.Add(time.Hour)}, 0, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := batchIDs(collect(t, ctx, js, "d1", tc.r, tc.upTo)); !slices.Equal(got, tc.want) && len(got)+len(tc.want) > 0 {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}

	t.Run("fn error stops", func(t *testing.T) {
		stop := errors.New("stop")
		n := 0
		err := Each(ctx, js, "d1", Range{}, 0, func(Msg) error {
			n++
			if n == 2 {
				return stop
			}
			return nil
		})
		if !errors.Is(err, stop) || n != 2 {
			t.Errorf("Each = %v after %d calls, want stop after 2", err, n)
		}
	})
	t.Run("invalid id", func(t *testing.T) {
		if err := Each(ctx, js, "d1.>", Range{}, 0, func(Msg) error { return nil }); !errors.Is(err, topology.ErrInvalidID) {
			t.Errorf("Each = %v, want ErrInvalidID", err)
		}
	})
}

func TestStats(t *testing.T) {
	js, ctx := setup(t)
	n, oldest, err := Stats(ctx, js, "d1")
	if err != nil || n != 0 || !oldest.IsZero() {
		t.Fatalf("Stats of nothing = %d, %v, %v", n, oldest, err)
	}
	park(t, ctx, js, "d2", "x", 2)
	park(t, ctx, js, "d1", "a", 3)
	first := collect(t, ctx, js, "d1", Range{}, 0)[0]
	n, oldest, err = Stats(ctx, js, "d1")
	if err != nil {
		t.Fatal(err)
	}
	if n != 3 || !oldest.Equal(first.Stored) {
		t.Errorf("Stats = %d, %v; want 3, %v", n, oldest, first.Stored)
	}
	// The oldest follows deletes.
	if err := Delete(ctx, js, first.Seq); err != nil {
		t.Fatal(err)
	}
	second := collect(t, ctx, js, "d1", Range{}, 0)[0]
	if n, oldest, err = Stats(ctx, js, "d1"); err != nil || n != 2 || !oldest.Equal(second.Stored) {
		t.Errorf("Stats after delete = %d, %v, %v; want 2, %v", n, oldest, err, second.Stored)
	}
}

func TestDeleteIsIdempotent(t *testing.T) {
	js, ctx := setup(t)
	park(t, ctx, js, "d1", "a", 2)
	ms := collect(t, ctx, js, "d1", Range{}, 0)
	for i := range 2 {
		if err := Delete(ctx, js, ms[0].Seq); err != nil {
			t.Fatalf("Delete #%d: %v", i+1, err)
		}
	}
	if got := batchIDs(collect(t, ctx, js, "d1", Range{}, 0)); !slices.Equal(got, []string{"a1"}) {
		t.Errorf("after delete: %v, want [a1]", got)
	}
}

func TestPurge(t *testing.T) {
	js, ctx := setup(t)
	park(t, ctx, js, "d1", "a", 4)
	park(t, ctx, js, "d2", "x", 2)
	ms := collect(t, ctx, js, "d1", Range{}, 0)

	n, err := Purge(ctx, js, "d1", Range{Start: ms[1].Stored, End: ms[3].Stored}, true)
	if err != nil || n != 2 {
		t.Fatalf("dry run = %d, %v; want 2", n, err)
	}
	if got := len(collect(t, ctx, js, "d1", Range{}, 0)); got != 4 {
		t.Fatalf("dry run deleted: %d left, want 4", got)
	}
	n, err = Purge(ctx, js, "d1", Range{Start: ms[1].Stored, End: ms[3].Stored}, false)
	if err != nil || n != 2 {
		t.Fatalf("purge = %d, %v; want 2", n, err)
	}
	if got := batchIDs(collect(t, ctx, js, "d1", Range{}, 0)); !slices.Equal(got, []string{"a0", "a3"}) {
		t.Errorf("after purge: %v, want [a0 a3]", got)
	}
	if n, err = Purge(ctx, js, "d1", Range{}, false); err != nil || n != 2 {
		t.Errorf("purge all = %d, %v; want 2", n, err)
	}
	if got := len(collect(t, ctx, js, "d2", Range{}, 0)); got != 2 {
		t.Errorf("purging d1 touched d2: %d left, want 2", got)
	}
}

// delivered returns the messages stored on imp.deliver.<dest>, in order.
func delivered(t *testing.T, ctx context.Context, js jetstream.JetStream, dest string) []*jetstream.RawStreamMsg {
	t.Helper()
	subj, _ := topology.Deliver(dest)
	s, err := js.Stream(ctx, topology.StreamDelivery)
	if err != nil {
		t.Fatal(err)
	}
	var out []*jetstream.RawStreamMsg
	for seq := uint64(1); ; {
		m, err := s.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(subj))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, m)
		seq = m.Sequence + 1
	}
}

func TestReplayMovesBatchesToDelivery(t *testing.T) {
	js, ctx := setup(t)
	want := park(t, ctx, js, "d1", "a", 5)
	park(t, ctx, js, "d2", "x", 2)
	seqs := collect(t, ctx, js, "d1", Range{}, 0)

	// A crash after publishing the first batch but before deleting it:
	// the replay publishes it again under the same id and DELIVERY keeps one.
	first := proto.Clone(seqs[0].Batch).(*eventv1.Batch)
	first.ParkReason, first.ParkedAt, first.Attempts = "", nil, 0
	data, _ := proto.Marshal(first)
	m := nats.NewMsg("imp.deliver.d1")
	m.Data = data
	m.Header.Set(jetstream.MsgIDHeader, "replay-"+strconv.FormatUint(seqs[0].Seq, 10))
	if _, err := js.PublishMsg(ctx, m); err != nil {
		t.Fatal(err)
	}

	batches, imps, err := Replay(ctx, js, "d1", ReplayOptions{Rate: 1000})
	if err != nil {
		t.Fatal(err)
	}
	if batches != 5 || imps != 10 {
		t.Errorf("Replay = %d batches, %d impressions; want 5, 10", batches, imps)
	}
	out := delivered(t, ctx, js, "d1")
	var got []string
	for i, m := range out {
		var b eventv1.Batch
		if err := proto.Unmarshal(m.Data, &b); err != nil {
			t.Fatal(err)
		}
		got = append(got, b.GetBatchId())
		if b.GetParkReason() != "" || b.GetParkedAt() != nil || b.GetAttempts() != 0 {
			t.Errorf("replayed batch kept its park fields: %v", &b)
		}
		if b.GetDestinationId() != "d1" || len(b.GetImpressions()) != 2 {
			t.Errorf("replayed batch = %v", &b)
		}
		if id, wantID := m.Header.Get(jetstream.MsgIDHeader), "replay-"+strconv.FormatUint(seqs[i].Seq, 10); id != wantID {
			t.Errorf("message id = %q, want %q", id, wantID)
		}
	}
	if !slices.Equal(got, want) {
		t.Errorf("delivered %v, want %v (oldest first, no duplicate)", got, want)
	}
	if left := collect(t, ctx, js, "d1", Range{}, 0); len(left) != 0 {
		t.Errorf("still parked after replay: %v", batchIDs(left))
	}
	if left := collect(t, ctx, js, "d2", Range{}, 0); len(left) != 2 {
		t.Errorf("replay of d1 touched d2: %d left", len(left))
	}
}

func TestReplayBounds(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts func(js jetstream.JetStream, ctx context.Context, ms []Msg, calls *int) ReplayOptions
		// moved is how many of the 4 parked batches are replayed.
		moved int
		// parkedAfter is how many batches are left parked.
		parkedAfter int
	}{
		{
			name: "batches parked during the replay wait for the next one",
			opts: func(js jetstream.JetStream, ctx context.Context, _ []Msg, calls *int) ReplayOptions {
				return ReplayOptions{Rate: 1000, Continue: func() bool {
					*calls++
					if *calls == 1 {
						// A lagging router parks a new batch mid-replay.
						if err := Park(ctx, js, batch("d1", "late", 1), Reason{Class: Paused}, 0, "late"); err != nil {
							panic(err)
						}
					}
					return true
				}}
			},
			moved: 4, parkedAfter: 1,
		},
		{
			name: "explicit UpTo",
			opts: func(_ jetstream.JetStream, _ context.Context, ms []Msg, _ *int) ReplayOptions {
				return ReplayOptions{Rate: 1000, UpTo: ms[1].Seq}
			},
			moved: 2, parkedAfter: 2,
		},
		{
			name: "range",
			opts: func(_ jetstream.JetStream, _ context.Context, ms []Msg, _ *int) ReplayOptions {
				return ReplayOptions{Rate: 1000, Range: Range{Start: ms[3].Stored}}
			},
			moved: 1, parkedAfter: 3,
		},
		{
			name: "Continue false stops it",
			opts: func(_ jetstream.JetStream, _ context.Context, _ []Msg, calls *int) ReplayOptions {
				return ReplayOptions{Rate: 1000, Continue: func() bool {
					*calls++
					return *calls <= 3
				}}
			},
			moved: 3, parkedAfter: 1,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			js, ctx := setup(t)
			park(t, ctx, js, "d1", "a", 4)
			ms := collect(t, ctx, js, "d1", Range{}, 0)
			calls := 0
			batches, _, err := Replay(ctx, js, "d1", tc.opts(js, ctx, ms, &calls))
			if err != nil {
				t.Fatal(err)
			}
			if batches != int64(tc.moved) {
				t.Errorf("replayed %d batches, want %d", batches, tc.moved)
			}
			if got := len(delivered(t, ctx, js, "d1")); got != tc.moved {
				t.Errorf("DELIVERY holds %d, want %d", got, tc.moved)
			}
			if got := len(collect(t, ctx, js, "d1", Range{}, 0)); got != tc.parkedAfter {
				t.Errorf("PARKED holds %d, want %d", got, tc.parkedAfter)
			}
		})
	}
}

func TestReplayRamps(t *testing.T) {
	js, ctx := setup(t)
	park(t, ctx, js, "d1", "a", 10)
	start := time.Now()
	// Without the ramp, 10 batches at 1/s would take 9s; doubling every
	// 200ms from the second batch on takes about 2s.
	batches, _, err := Replay(ctx, js, "d1", ReplayOptions{Rate: 1, MaxRate: 1000, RampEvery: 200 * time.Millisecond})
	if err != nil || batches != 10 {
		t.Fatalf("Replay = %d, %v; want 10", batches, err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("ramped replay took %v, want < 5s (9s without the ramp)", el)
	}
}

func TestReplayRate20At10PerSecond(t *testing.T) {
	js, ctx := setup(t)
	park(t, ctx, js, "d1", "a", 20)
	start := time.Now()
	// The limiter holds one token: the first batch goes at once, the other
	// 19 one every 100ms, 1.9s in all.
	batches, _, err := Replay(ctx, js, "d1", ReplayOptions{Rate: 10})
	if err != nil || batches != 20 {
		t.Fatalf("Replay = %d, %v; want 20", batches, err)
	}
	if el := time.Since(start); el < 1500*time.Millisecond {
		t.Errorf("20 batches at 10/s took %v, want ≥ 1.5s", el)
	}
}

func TestReplayStopsWithContext(t *testing.T) {
	js, ctx := setup(t)
	park(t, ctx, js, "d1", "a", 10)
	rctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	batches, _, err := Replay(rctx, js, "d1", ReplayOptions{Rate: 5})
	if err == nil {
		t.Fatal("Replay ignored its context")
	}
	if batches >= 10 {
		t.Errorf("replayed %d of 10 in 300ms at 5/s", batches)
	}
	// What was not replayed is still parked: nothing lost.
	if left := int64(len(collect(t, ctx, js, "d1", Range{}, 0))); left+batches != 10 {
		t.Errorf("parked %d + replayed %d != 10", left, batches)
	}
}

func TestConcurrentReplaysDeliverEachBatchOnce(t *testing.T) {
	js, ctx := setup(t)
	want := park(t, ctx, js, "d1", "a", 30)
	// Two routers replaying the same destination (a lease handover): both
	// may publish and delete the same batch. Neither fails, DELIVERY keeps
	// one copy of each, and PARKED ends empty.
	errs := make(chan error, 2)
	for range 2 {
		go func() {
			_, _, err := Replay(ctx, js, "d1", ReplayOptions{Rate: 1000})
			errs <- err
		}()
	}
	for range 2 {
		if err := <-errs; err != nil {
			t.Errorf("Replay: %v", err)
		}
	}
	var got []string
	for _, m := range delivered(t, ctx, js, "d1") {
		var b eventv1.Batch
		if err := proto.Unmarshal(m.Data, &b); err != nil {
			t.Fatal(err)
		}
		got = append(got, b.GetBatchId())
	}
	if !slices.Equal(got, want) {
		t.Errorf("delivered %v, want each of %v once, in order", got, want)
	}
	if left := collect(t, ctx, js, "d1", Range{}, 0); len(left) != 0 {
		t.Errorf("still parked: %v", batchIDs(left))
	}
}
