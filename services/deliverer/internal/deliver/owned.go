package deliver

import (
	"time"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
)

// owned is a message a lane holds until it is acknowledged or handed back.
type owned struct {
	msg    jetstream.Msg
	stored time.Time // when DELIVERY stored it
	bytes  int
}

// accept records a message as owned, or skips a redelivery of one already
// owned (a progress ack was late): that one is still being worked on.
func (l *lane) accept(m jetstream.Msg) (routed, bool) {
	md, err := m.Metadata()
	if err != nil {
		l.d.log.Error("message without metadata", "destination", l.id, "err", err)
		return routed{}, false
	}
	seq := md.Sequence.Stream
	l.mu.Lock()
	_, dup := l.owned[seq]
	if !dup {
		l.owned[seq] = owned{msg: m, stored: md.Timestamp, bytes: len(m.Data())}
		l.ownedBytes += len(m.Data())
	}
	l.mu.Unlock()
	if dup {
		return routed{}, false
	}
	var bt eventv1.Batch
	if err := proto.Unmarshal(m.Data(), &bt); err != nil {
		// The router only publishes valid batches: this is corruption.
		l.d.log.Error("undecodable batch terminated", "destination", l.id, "seq", seq, "err", err)
		l.release(seq)
		_ = m.Term()
		return routed{}, false
	}
	return routed{msg: m, seq: seq, batch: &bt}, true
}

func (l *lane) ack(r routed) {
	if err := r.msg.Ack(); err != nil {
		l.d.log.Warn("ack", "destination", l.id, "err", err)
	}
	l.release(r.seq)
}

func (l *lane) release(seq uint64) {
	l.mu.Lock()
	if o, ok := l.owned[seq]; ok {
		l.ownedBytes -= o.bytes
		delete(l.owned, seq)
	}
	l.mu.Unlock()
	// The lane may have stopped taking messages at its byte budget.
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// full reports whether the lane owns its byte budget of messages.
func (l *lane) full() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ownedBytes >= l.d.cfg.LaneMaxBytes
}

// oldestOwned returns when the oldest message the lane holds was stored,
// and false when it holds none.
func (l *lane) oldestOwned() (time.Time, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var oldest time.Time
	for _, o := range l.owned {
		if oldest.IsZero() || o.stored.Before(oldest) {
			oldest = o.stored
		}
	}
	return oldest, !oldest.IsZero()
}

// touch extends the ack deadline of every owned message.
func (l *lane) touch() {
	l.mu.Lock()
	msgs := make([]jetstream.Msg, 0, len(l.owned))
	for _, o := range l.owned {
		msgs = append(msgs, o.msg)
	}
	l.mu.Unlock()
	for _, m := range msgs {
		_ = m.InProgress()
	}
}

// handBack returns every owned message to JetStream at shutdown, so another
// replica delivers it without waiting for the ack deadline.
func (l *lane) handBack() {
	l.mu.Lock()
	msgs := l.owned
	l.owned, l.ownedBytes = map[uint64]owned{}, 0
	l.mu.Unlock()
	for _, o := range msgs {
		_ = o.msg.Nak()
	}
}
