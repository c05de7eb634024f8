package deliver

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/services/deliverer/internal/batch"
)

// routed is one DELIVERY message with its decoded batch.
type routed struct {
	msg   jetstream.Msg
	seq   uint64
	batch *eventv1.Batch
}

// job is one POST: a batch of routed messages and its retry state.
type job struct {
	lane    *lane
	batch   batch.Batch[routed]
	body    []byte
	attempt int
	first   time.Time
}

// lane is one destination: its consumer, its batch builder and every message
// it owns until acknowledged.
type lane struct {
	d      *Deliverer
	id     string
	tenant string
	// cons is set once ensureConsumer succeeds; the lag watcher reads it
	// from its own goroutine, possibly before then.
	cons atomic.Pointer[jetstream.Consumer]

	mu      sync.Mutex
	dest    *adminv1.Destination
	secrets [][]byte
	hold    parked.Class // why the destination must not receive traffic now; 0 while it may
	state   eventv1.State
	deleted bool
	owned   map[uint64]owned // by stream sequence
	// ownedBytes is the size of the owned messages (Config.LaneMaxBytes).
	ownedBytes int
	wake       chan struct{}
	// repull asks the lane to replace its pull subscription (see starving).
	repull chan struct{}
	// starved counts the lag watcher's consecutive starving observations;
	// only the watcher's goroutine touches it.
	starved int
}

func newLane(d *Deliverer, dest *adminv1.Destination) *lane {
	l := emptyLane(d, dest.GetId(), dest.GetTenantId())
	l.setDestination(dest)
	return l
}

// emptyLane returns a lane with no destination settings yet.
func emptyLane(d *Deliverer, id, tenant string) *lane {
	return &lane{d: d, id: id, tenant: tenant, owned: map[uint64]owned{}, wake: make(chan struct{}, 1), repull: make(chan struct{}, 1)}
}

func (l *lane) setDestination(dest *adminv1.Destination) {
	s, err := secrets(dest, time.Now())
	l.mu.Lock()
	l.dest = dest
	l.deleted = false // re-created under the same id
	if err != nil {
		l.d.log.Error("destination unusable", "destination", l.id, "err", err)
		s = nil
	}
	l.secrets = s
	l.mu.Unlock()
	l.update()
}

func (l *lane) setDecision(dec *eventv1.Decision) {
	l.mu.Lock()
	l.state = dec.GetState()
	l.mu.Unlock()
	l.update()
}

func (l *lane) setDeleted() {
	l.mu.Lock()
	l.deleted = true
	l.mu.Unlock()
	l.update()
}

// update recomputes whether the lane holds its traffic. When it starts to,
// queued batches are taken back from the scheduler and parked at once, so a
// quarantined destination frees every slot it held but those in flight.
func (l *lane) update() {
	l.mu.Lock()
	was := l.hold
	c, held := registry.Hold(l.dest, l.state)
	switch {
	case l.deleted:
		l.hold = parked.Deleted
	case held:
		l.hold = c
	case l.secrets == nil:
		l.hold = parked.NoSecret
	default:
		l.hold = 0
	}
	now := l.hold
	l.mu.Unlock()
	if now != 0 && was == 0 {
		jobs := l.d.sched.Drain(l.id)
		// Refused only at shutdown: the jobs' messages are still owned, and
		// handBack returns them.
		if len(jobs) > 0 {
			l.d.group.Go(func() {
				for _, j := range jobs {
					l.park(j, parked.Reason{Class: now})
				}
			})
		}
	}
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// holding returns why the lane holds its traffic, and false while it does
// not.
func (l *lane) holding() (parked.Reason, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return parked.Reason{Class: l.hold}, l.hold != 0
}

// request returns what a POST needs from the destination's current settings.
func (l *lane) request() (*adminv1.Destination, [][]byte) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.dest, l.secrets
}

func (l *lane) isDeleted() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.deleted
}
