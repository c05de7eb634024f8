// Package batch merges the routed messages of one destination into the
// batches the deliverer POSTs, and names each batch with a stable webhook id.
package batch

import (
	"crypto/sha256"
	"encoding/base32"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"time"
)

// ErrInvalidLimits is wrapped by Limits.Validate and NewBuilder for limits that
// cannot be used.
var ErrInvalidLimits = errors.New("invalid batch limits")

// ErrFull is returned by Builder.Add when the item does not fit in the open
// batch; Take the batch, then add the item to the next one.
var ErrFull = errors.New("batch full")

// ErrInvalidItem is returned by Builder.Add for an item with a negative
// impression count or byte size.
var ErrInvalidItem = errors.New("invalid batch item")

// ErrNotEmpty is returned by Builder.SetLimits while a batch is open.
var ErrNotEmpty = errors.New("batch open")

// Limits bound one batch. A batch is sent when the next item would take it
// over MaxImpressions or MaxBytes, or Linger after its first item was added,
// whichever comes first.
type Limits struct {
	// MaxImpressions is the most impressions one POST carries.
	MaxImpressions int
	// MaxBytes is the largest body one POST carries, before compression.
	MaxBytes int
	// Linger is how long the first item of a batch waits for company.
	Linger time.Duration
}

// Validate returns an error wrapping ErrInvalidLimits when l cannot be used.
// A zero Linger is valid: every batch is due as soon as it holds an item.
func (l Limits) Validate() error {
	switch {
	case l.MaxImpressions < 1:
		return fmt.Errorf("validate: max impressions %d must be at least 1: %w", l.MaxImpressions, ErrInvalidLimits)
	case l.MaxBytes < 1:
		return fmt.Errorf("validate: max bytes %d must be at least 1: %w", l.MaxBytes, ErrInvalidLimits)
	case l.Linger < 0:
		return fmt.Errorf("validate: linger %v must not be negative: %w", l.Linger, ErrInvalidLimits)
	}
	return nil
}

// Item is one routed message as the builder sees it. Value is opaque: the
// deliverer carries its JetStream message there, tests carry anything.
type Item[T any] struct {
	// ID is the message's unique id (the JetStream message id); the batch's
	// webhook id is derived from the ids of its items.
	ID string
	// Impressions is the number of impressions in the message.
	Impressions int
	// Bytes is the message's share of the POST body, before compression.
	Bytes int
	// Value is the caller's payload.
	Value T
}

// Batch is a set of items sent in one POST.
type Batch[T any] struct {
	// ID is the batch's Standard Webhooks webhook-id: WebhookID of its items'
	// ids.
	ID string
	// Items are in the order they were added.
	Items []Item[T]
	// Impressions and Bytes are the sums over Items.
	Impressions, Bytes int
	// Opened is when the first item was added.
	Opened time.Time
}

// IDs returns the ids of b's items, in order.
func (b Batch[T]) IDs() []string {
	ids := make([]string, len(b.Items))
	for i, it := range b.Items {
		ids[i] = it.ID
	}
	return ids
}

// Builder accumulates the items of one destination into a batch. A Builder is
// not safe for concurrent use: each destination lane owns one.
type Builder[T any] struct {
	limits      Limits
	items       []Item[T]
	impressions int
	bytes       int
	opened      time.Time
}

// NewBuilder returns an empty builder, or an error wrapping ErrInvalidLimits.
func NewBuilder[T any](l Limits) (*Builder[T], error) {
	if err := l.Validate(); err != nil {
		return nil, fmt.Errorf("new builder: %w", err)
	}
	return &Builder[T]{limits: l}, nil
}

// Limits returns the limits the builder enforces.
func (b *Builder[T]) Limits() Limits { return b.limits }

// SetLimits changes the limits of an empty builder; it returns
// ErrNotEmpty while items are open, so no open batch changes its limits.
func (b *Builder[T]) SetLimits(l Limits) error {
	if err := l.Validate(); err != nil {
		return fmt.Errorf("set limits: %w", err)
	}
	if len(b.items) > 0 {
		return fmt.Errorf("set limits: %w", ErrNotEmpty)
	}
	b.limits = l
	return nil
}

// Len returns the number of items in the open batch.
func (b *Builder[T]) Len() int { return len(b.items) }

// Full reports whether the open batch has reached a limit, so that no further
// item can be added: it should be taken now.
func (b *Builder[T]) Full() bool {
	return len(b.items) > 0 && (b.impressions >= b.limits.MaxImpressions || b.bytes >= b.limits.MaxBytes)
}

// Fits reports whether it can be added without taking the open batch over a
// limit. An item always fits an empty builder, even one larger than the
// limits: a message is never split (its impressions were accepted together and
// are delivered together), so an oversized item is sent alone, and the builder
// is Full once it holds it.
func (b *Builder[T]) Fits(it Item[T]) bool {
	if len(b.items) == 0 {
		return true
	}
	return !b.Full() &&
		b.impressions+it.Impressions <= b.limits.MaxImpressions &&
		b.bytes+it.Bytes <= b.limits.MaxBytes
}

// Add adds it to the open batch at time now. It returns ErrFull, and adds
// nothing, when it does not Fit, and ErrInvalidItem for negative sizes.
func (b *Builder[T]) Add(it Item[T], now time.Time) error {
	if it.Impressions < 0 || it.Bytes < 0 {
		return fmt.Errorf("add %s: %d impressions, %d bytes: %w", it.ID, it.Impressions, it.Bytes, ErrInvalidItem)
	}
	if !b.Fits(it) {
		return ErrFull
	}
	if len(b.items) == 0 {
		b.opened = now
	}
	b.items = append(b.items, it)
	b.impressions += it.Impressions
	b.bytes += it.Bytes
	return nil
}

// Deadline returns when the open batch's linger ends, and false when the
// builder is empty.
func (b *Builder[T]) Deadline() (time.Time, bool) {
	if len(b.items) == 0 {
		return time.Time{}, false
	}
	return b.opened.Add(b.limits.Linger), true
}

// Due reports whether the open batch should be taken at now: it is Full or
// its linger has ended. An empty builder is never due.
func (b *Builder[T]) Due(now time.Time) bool {
	d, ok := b.Deadline()
	return ok && (b.Full() || !now.Before(d))
}

// Take returns the open batch, with its webhook id, and empties the builder.
// The caller owns the returned Items. Take on an empty builder returns the
// zero Batch.
func (b *Builder[T]) Take() Batch[T] {
	if len(b.items) == 0 {
		return Batch[T]{}
	}
	out := Batch[T]{
		Items:       b.items,
		Impressions: b.impressions,
		Bytes:       b.bytes,
		Opened:      b.opened,
	}
	out.ID = WebhookID(out.IDs())
	// The next batch is likely as long as this one; size it so appends do not
	// regrow it item by item.
	b.items = make([]Item[T], 0, len(out.Items))
	b.impressions, b.bytes, b.opened = 0, 0, time.Time{}
	return out
}

// webhookIDPrefix marks a Bulkhead webhook id, as Standard Webhooks examples
// do.
const webhookIDPrefix = "msg_"

// WebhookID returns the Standard Webhooks webhook-id of a batch of messages:
// "msg_" and the lower-case, unpadded base32 of the first 16 bytes of SHA-256
// over the ids, 30 characters in all. It depends only on the set of ids, not
// on their order or on time, so the same messages keep the same id when a
// batch is retried or rebuilt after a restart (even if redelivery reordered
// them), and receivers can dedupe on it. ids are length-prefixed before
// hashing, so no two different lists collide by concatenation. ids is not
// modified.
func WebhookID(ids []string) string {
	sorted := slices.Clone(ids)
	slices.Sort(sorted)
	size := 0
	for _, id := range sorted {
		size += binary.MaxVarintLen64 + len(id)
	}
	buf := make([]byte, 0, size)
	for _, id := range sorted {
		buf = binary.AppendUvarint(buf, uint64(len(id)))
		buf = append(buf, id...)
	}
	sum := sha256.Sum256(buf)

	const keep = 16 // 128 bits: collisions are not a concern.
	enc := base32.StdEncoding.WithPadding(base32.NoPadding)
	out := make([]byte, len(webhookIDPrefix)+enc.EncodedLen(keep))
	copy(out, webhookIDPrefix)
	enc.Encode(out[len(webhookIDPrefix):], sum[:keep])
	for i := len(webhookIDPrefix); i < len(out); i++ {
		if 'A' <= out[i] && out[i] <= 'Z' {
			out[i] += 'a' - 'A'
		}
	}
	return string(out)
}
