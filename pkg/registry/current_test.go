package registry

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/bulkhead-io/bulkhead/pkg/poll"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

// A batch accepted after a destination was stored must see it: AwaitCurrent
// closes the gap between a KV write and the watch delivering it.
func TestAwaitCurrentSeesEveryEarlierWrite(t *testing.T) {
	js, dests, _ := setup(t)
	r := openView(t, js, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := range 200 {
		id := fmt.Sprintf("d%d", i)
		putDest(t, dests, id, "t1")
		if err := r.AwaitCurrent(ctx, time.Now()); err != nil {
			t.Fatalf("after put %d: %v", i, err)
		}
		if r.Destination(id) == nil {
			t.Fatalf("put %s, AwaitCurrent returned, the view does not hold it", id)
		}
		if i%2 == 0 {
			if err := dests.Delete(ctx, id); err != nil {
				t.Fatal(err)
			}
			if err := r.AwaitCurrent(ctx, time.Now()); err != nil {
				t.Fatal(err)
			}
			if r.Destination(id) != nil {
				t.Fatalf("deleted %s, AwaitCurrent returned, the view still holds it", id)
			}
		}
	}
	// Callers that received their batches before a completed check need no
	// new round trip.
	before := time.Now()
	if err := r.AwaitCurrent(ctx, before); err != nil {
		t.Fatal(err)
	}
	r.cur.mu.Lock()
	asOf := r.cur.asOf
	r.cur.mu.Unlock()
	if err := r.AwaitCurrent(ctx, before.Add(-time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	r.cur.mu.Lock()
	defer r.cur.mu.Unlock()
	if !r.cur.asOf.Equal(asOf) {
		t.Errorf("an older batch started a new check (as of %v, then %v)", asOf, r.cur.asOf)
	}
}

// A view that applied revision applied of the bucket, with checks bounded by
// timeout: what a watch that lags (or missed a removed message) looks like.
func lagging(t *testing.T, js jetstream.JetStream, applied uint64, timeout time.Duration) *Registry {
	t.Helper()
	s, err := js.Stream(context.Background(), "KV_"+topology.BucketDestinations)
	if err != nil {
		t.Fatal(err)
	}
	c := newCurrent(js, s)
	c.timeout = timeout
	c.apply(applied)
	return &Registry{cur: c}
}

// A watch that is behind is never taken for current, however often asked.
func TestAwaitCurrentRefusesAViewBehindTheBucket(t *testing.T) {
	js, dests, _ := setup(t)
	putDest(t, dests, "d1", "t1")
	putDest(t, dests, "d2", "t1")
	r := lagging(t, js, 1, 100*time.Millisecond)
	ctx := context.Background()
	for i := range 3 {
		if err := r.AwaitCurrent(ctx, time.Now()); err == nil {
			t.Fatalf("check %d accepted a view behind the bucket", i)
		}
	}
	r.cur.apply(2)
	if err := r.AwaitCurrent(ctx, time.Now()); err != nil {
		t.Fatalf("view at the last revision: %v", err)
	}
}

// A last sequence whose message was removed outside the KV API (here: a
// subject purge) is never delivered by a watch; once the leader confirms it
// is gone it costs one timeout, not a routing stall.
func TestAwaitCurrentAcceptsARemovedLastMessage(t *testing.T) {
	js, dests, _ := setup(t)
	putDest(t, dests, "d1", "t1")
	putDest(t, dests, "d2", "t1")
	ctx := context.Background()
	s, err := js.Stream(ctx, "KV_"+topology.BucketDestinations)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Purge(ctx, jetstream.WithPurgeSubject("$KV."+topology.BucketDestinations+".d2")); err != nil {
		t.Fatal(err)
	}
	if info, err := s.Info(ctx); err != nil || info.State.LastSeq != 2 || info.State.Msgs != 1 {
		t.Fatalf("after the purge: %+v %v, want last sequence 2 and one message", info, err)
	}
	r := lagging(t, js, 1, 500*time.Millisecond)
	start := time.Now()
	if err := r.AwaitCurrent(ctx, time.Now()); err != nil {
		t.Fatalf("removed last message: %v", err)
	}
	if waited := time.Since(start); waited < 400*time.Millisecond {
		t.Errorf("accepted after %v without waiting for the watch first", waited)
	}
	start = time.Now()
	if err := r.AwaitCurrent(ctx, time.Now()); err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(start); waited >= 500*time.Millisecond {
		t.Errorf("second check waited %v for a message known to be gone", waited)
	}
	// A later write is waited for again.
	putDest(t, dests, "d3", "t1")
	if err := r.AwaitCurrent(ctx, time.Now()); err == nil {
		t.Fatal("a new write the view lacks was accepted")
	}
	r.cur.apply(3)
	if err := r.AwaitCurrent(ctx, time.Now()); err != nil {
		t.Fatalf("view at the last revision: %v", err)
	}

	// A purged stream: every sequence is gone.
	if err := s.Purge(ctx); err != nil {
		t.Fatal(err)
	}
	if err := lagging(t, js, 0, 500*time.Millisecond).AwaitCurrent(ctx, time.Now()); err != nil {
		t.Fatalf("purged bucket: %v", err)
	}
}

// A caller whose context ends stops waiting.
func TestAwaitCurrentHonoursContext(t *testing.T) {
	js, dests, _ := setup(t)
	putDest(t, dests, "d1", "t1")
	r := lagging(t, js, 0, 200*time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := r.AwaitCurrent(ctx, time.Now()); err == nil {
		t.Fatal("cancelled context, AwaitCurrent returned nil")
	}
	// The abandoned check ends by its own timeout; wait for it before
	// goleak looks.
	poll.CheckFor(t, 10*time.Second, 10*time.Millisecond, func() error {
		r.cur.mu.Lock()
		defer r.cur.mu.Unlock()
		if r.cur.check != nil {
			return errors.New("check still running")
		}
		return nil
	})
}
