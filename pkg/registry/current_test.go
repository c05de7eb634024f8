package registry

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/pkg/subject"
)

// A batch accepted after a destination was stored must see it: AwaitCurrent
// closes the gap between a KV write and the watch delivering it.
func TestAwaitCurrentSeesEveryEarlierWrite(t *testing.T) {
	js, dests, _ := setup(t)
	r := watch(t, js, nil)
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

// A last sequence the watch never delivers (its message removed outside the
// KV API) costs one timeout, not a routing stall.
func TestAwaitCurrentGivesUpOnAnUnreachableSequence(t *testing.T) {
	js, dests, _ := setup(t)
	putDest(t, dests, "d1", "t1")
	putDest(t, dests, "d2", "t1")
	ctx := context.Background()
	s, err := js.Stream(ctx, "KV_"+subject.BucketDestinations)
	if err != nil {
		t.Fatal(err)
	}
	// A view that applied revision 1 but never sees 2: what a watch that
	// missed a removed message looks like.
	r := &Registry{cur: newCurrent(s)}
	r.cur.apply(1)
	start := time.Now()
	if err := r.AwaitCurrent(ctx, time.Now()); err == nil {
		t.Fatal("AwaitCurrent accepted a view behind the bucket")
	}
	if waited := time.Since(start); waited < CurrentTimeout/2 {
		t.Errorf("gave up after %v, want about %v", waited, CurrentTimeout)
	}
	start = time.Now()
	if err := r.AwaitCurrent(ctx, time.Now()); err != nil {
		t.Fatalf("second wait for the same sequence: %v", err)
	}
	if waited := time.Since(start); waited >= CurrentTimeout {
		t.Errorf("second wait took %v: the sequence given up on stalls callers", waited)
	}
	// A later write is waited for again.
	putDest(t, dests, "d3", "t1")
	wctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	if err := r.AwaitCurrent(wctx, time.Now()); err == nil {
		t.Fatal("a new write the view lacks was not waited for")
	}
	r.cur.apply(3)
	if err := r.AwaitCurrent(ctx, time.Now()); err != nil {
		t.Fatalf("view at the last revision: %v", err)
	}
}

// A caller whose context ends stops waiting.
func TestAwaitCurrentHonoursContext(t *testing.T) {
	js, dests, _ := setup(t)
	putDest(t, dests, "d1", "t1")
	s, err := js.Stream(context.Background(), "KV_"+subject.BucketDestinations)
	if err != nil {
		t.Fatal(err)
	}
	r := &Registry{cur: newCurrent(s)}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := r.AwaitCurrent(ctx, time.Now()); err == nil {
		t.Fatal("cancelled context, AwaitCurrent returned nil")
	}
	// Let the abandoned check finish before goleak looks.
	time.Sleep(CurrentTimeout + 200*time.Millisecond)
}
