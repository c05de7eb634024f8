package deliver

import (
	"context"
	"time"

	"github.com/bulkhead-io/bulkhead/pkg/parked"
)

// park stores every message of j in PARKED with reason, then acknowledges it.
// A message that cannot be parked (PARKED full, NATS away) is handed back
// with a delay and parked again later; it is never dropped.
func (l *lane) park(j *job, reason parked.Reason) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, it := range j.batch.Items {
		r := it.Value
		if r.batch.GetDestinationId() == "" {
			r.batch.DestinationId = l.id
		}
		if err := parked.Park(ctx, l.d.js, r.batch, reason, int32(j.attempt), it.ID); err != nil {
			l.d.log.Error("park failed; message handed back", "destination", l.id, "err", err)
			l.d.metrics.parkFailed.Inc()
			l.release(r.seq)
			_ = r.msg.NakWithDelay(5 * time.Second)
			continue
		}
		l.d.metrics.parked.WithLabelValues(l.id, reason.Class.String()).Add(float64(len(r.batch.GetImpressions())))
		l.ack(r)
	}
}

// exhausted is the reason of a batch whose retries ran out.
func exhausted(attempts int, err error) parked.Reason {
	return parked.Because(parked.Exhausted, "retries exhausted after %d attempts: %v", attempts, err)
}
