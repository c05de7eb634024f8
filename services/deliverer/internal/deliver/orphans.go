package deliver

import (
	"context"
	"time"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

// adoptOrphans parks the DELIVERY backlog of destinations that no longer
// exist. Deleting a destination while no deliverer runs, or a batch that
// lands after its lane removed the consumer, used to leave batches in
// DELIVERY for good: invisible to export, counted against the stream, and
// waiting for the next holder of the id (F6). Each one found gets a lane
// that holds as deleted, parks what it pulls and removes the consumer, as a
// lane of a destination deleted while served does. It is the body of a loop
// every OrphanInterval.
func (d *Deliverer) adoptOrphans(ctx context.Context) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := d.js.Stream(cctx, topology.StreamDelivery)
	if err != nil {
		return
	}
	sh, err := stream.PerSubject(cctx, st, topology.AllDeliver)
	if err != nil {
		return
	}
	// After the snapshot, not before: every destination whose batches are in
	// it was stored before it was taken, so a view current as of now holds
	// it unless it was deleted. A live destination is never taken for dead.
	if err := d.view.AwaitCurrent(cctx, time.Now()); err != nil {
		return
	}
	for id, n := range sh.ByID {
		if d.view.Destination(id) != nil {
			continue
		}
		d.mu.Lock()
		if _, ok := d.lanes[id]; !ok {
			l := newOrphanLane(d, id)
			if d.group.Go(func() { d.runLane(ctx, l) }) {
				d.lanes[id] = l
				d.log.Warn("parking the DELIVERY backlog of a deleted destination", "destination", id, "batches", n)
			}
		}
		d.mu.Unlock()
	}
}

// newOrphanLane returns a lane for a destination that no longer exists: it
// holds as deleted from the start. If the id is created again meanwhile the
// lane serves it (with no tenant for fair scheduling until it is replaced);
// issue 9's destination incarnations settle what a reused id may inherit.
func newOrphanLane(d *Deliverer, id string) *lane {
	l := emptyLane(d, id, "")
	l.dest, l.deleted, l.hold = &adminv1.Destination{Id: id}, true, parked.Deleted
	return l
}
