package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/bulkhead-io/bulkhead/e2e/internal/fleet"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/webhook"
)

// floorResult is what the floor relay sustained.
type floorResult struct {
	ImpressionsPerSec float64 `json:"impressions_per_s"`
	PostsPerSec       float64 `json:"posts_per_s"`
	Batch             int     `json:"batch"`
	Workers           int     `json:"workers"`
	Seconds           float64 `json:"seconds"`
	Failures          int64   `json:"failures"`
}

// floorRelay measures the least any JetStream-based webhook relay must do:
// a publisher keeps a file-backed work-queue stream full of ready webhook
// bodies of batch impressions each; ONE pull consumer feeds workers that
// POST each body (signed, like the deliverer) to the fleet's destinations
// in turn and ack after the 2xx. Nothing else: no ingest API, no routing,
// no per-destination consumers, scheduling, retries or health. It returns
// the impressions per second delivered over dur, after a warm-up of warm.
func floorRelay(ctx context.Context, natsURL string, fl *fleet.Fleet, batch, workers int, warm, dur time.Duration) (floorResult, error) {
	res := floorResult{Batch: batch, Workers: workers, Seconds: dur.Seconds()}
	nc, err := nats.Connect(natsURL, nats.Name("bench-floor"))
	if err != nil {
		return res, fmt.Errorf("floor: connect: %w", err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(512))
	if err != nil {
		return res, err
	}
	ctx, cancel := context.WithTimeout(ctx, warm+dur+time.Minute)
	defer cancel()
	st, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name: "FLOOR", Subjects: []string{"floor.>"}, Retention: jetstream.WorkQueuePolicy,
		Storage: jetstream.FileStorage, MaxBytes: 1 << 30, Discard: jetstream.DiscardNew,
	})
	if err != nil {
		return res, fmt.Errorf("floor: stream: %w", err)
	}
	cons, err := st.CreateOrUpdateConsumer(ctx, jetstream.ConsumerConfig{
		Durable: "relay", AckPolicy: jetstream.AckExplicitPolicy, MaxAckPending: 4 * workers, AckWait: 30 * time.Second,
	})
	if err != nil {
		return res, fmt.Errorf("floor: consumer: %w", err)
	}
	secret := bytes.Repeat([]byte{7}, 32)
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()

	// Publisher: keep about 4×workers bodies queued ahead of the relay.
	var published, acked atomic.Int64
	wg.Go(func() {
		imps := make([]*ingestv1.Impression, batch)
		for n := 0; runCtx.Err() == nil; n++ {
			for published.Load()-acked.Load() > int64(8*workers) && runCtx.Err() == nil {
				time.Sleep(time.Millisecond)
			}
			now := time.Now()
			for j := range imps {
				imps[j] = impressionForFloor("f-"+strconv.Itoa(n)+"-"+strconv.Itoa(j), now)
			}
			body, err := webhook.EncodeBody(imps)
			if err != nil {
				return
			}
			if _, err := js.PublishAsync("floor."+strconv.Itoa(n%fl.Len()), body); err != nil {
				time.Sleep(5 * time.Millisecond)
				continue
			}
			published.Add(1)
		}
	})

	msgs, err := cons.Messages(jetstream.PullMaxMessages(2 * workers))
	if err != nil {
		return res, fmt.Errorf("floor: consume: %w", err)
	}
	defer msgs.Stop()
	feed := make(chan jetstream.Msg)
	wg.Go(func() {
		defer close(feed)
		for {
			m, err := msgs.Next()
			if err != nil {
				return
			}
			select {
			case feed <- m:
			case <-runCtx.Done():
				return
			}
		}
	})
	tr := &http.Transport{MaxIdleConnsPerHost: workers, MaxIdleConns: 4 * workers, IdleConnTimeout: time.Minute, DisableCompression: true}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	var posts, failures atomic.Int64
	var counting atomic.Bool
	for range workers {
		wg.Go(func() {
			for m := range feed {
				dest, _ := strconv.Atoi(m.Subject()[len("floor."):])
				id := "floor_" + strconv.FormatUint(seqOf(m), 10)
				now := time.Now()
				req, _ := http.NewRequestWithContext(runCtx, http.MethodPost, fl.URL(dest%fl.Len()), bytes.NewReader(m.Data()))
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set(webhook.HeaderID, id)
				req.Header.Set(webhook.HeaderTimestamp, strconv.FormatInt(now.Unix(), 10))
				req.Header.Set(webhook.HeaderSignature, webhook.Sign(secret, id, now, m.Data()))
				resp, err := client.Do(req)
				if err == nil {
					_, _ = io.Copy(io.Discard, resp.Body)
					_ = resp.Body.Close()
				}
				if err != nil || resp.StatusCode/100 != 2 {
					failures.Add(1)
					_ = m.Nak()
					continue
				}
				if err := m.Ack(); err != nil {
					failures.Add(1)
					continue
				}
				acked.Add(1)
				if counting.Load() {
					posts.Add(1)
				}
			}
		})
	}
	select {
	case <-time.After(warm):
	case <-ctx.Done():
		return res, ctx.Err()
	}
	counting.Store(true)
	t0 := time.Now()
	select {
	case <-time.After(dur):
	case <-ctx.Done():
		return res, ctx.Err()
	}
	counting.Store(false)
	el := time.Since(t0).Seconds()
	stop()
	res.PostsPerSec = float64(posts.Load()) / el
	res.ImpressionsPerSec = res.PostsPerSec * float64(batch)
	res.Failures = failures.Load()
	if posts.Load() == 0 {
		return res, errors.New("floor: nothing delivered")
	}
	return res, nil
}

func seqOf(m jetstream.Msg) uint64 {
	md, err := m.Metadata()
	if err != nil {
		return 0
	}
	return md.Sequence.Stream
}

func impressionForFloor(key string, at time.Time) *ingestv1.Impression {
	return &ingestv1.Impression{
		Key: key, Split: "new_checkout", EnvironmentId: "env-1", EnvironmentName: "prod", Treatment: "on",
		Time: at.UnixMilli(), BucketingKey: key, Label: "default rule", MachineName: "host-7",
		MachineIp: "10.0.0.7", SplitVersionNumber: 1699999999999, Sdk: "go", SdkVersion: "6.4.0", Properties: "{}",
	}
}
