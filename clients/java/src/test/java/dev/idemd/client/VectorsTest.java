package dev.idemd.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.Map;
import org.junit.jupiter.api.Test;

/** clients/testdata/vectors.json (copied by scripts/sync), which every client's tests read. */
class VectorsTest {
  private static JsonObject vectors() throws Exception {
    try (InputStream in = VectorsTest.class.getResourceAsStream("/idemd/vectors.json")) {
      assertNotNull(in, "src/test/resources/idemd/vectors.json: run scripts/sync");
      return JsonParser.parseReader(new InputStreamReader(in, StandardCharsets.UTF_8)).getAsJsonObject();
    }
  }

  @Test
  void keysAndFingerprintsMatchTheSharedVectors() throws Exception {
    JsonObject vectors = vectors();
    int keys = 0;
    for (JsonElement element : vectors.getAsJsonArray("entity_keys")) {
      JsonObject vector = element.getAsJsonObject();
      assertEquals(vector.get("key").getAsString(),
          Keys.entityKey(vector.get("entity").getAsString(), vector.get("operation").getAsString()), vector.toString());
      keys++;
    }
    int fingerprints = 0;
    for (JsonElement element : vectors.getAsJsonArray("fingerprints")) {
      JsonObject vector = element.getAsJsonObject();
      Map<String, Object> fields = new LinkedHashMap<>();
      for (Map.Entry<String, JsonElement> field : vector.getAsJsonObject("fields").entrySet()) {
        fields.put(field.getKey(), field.getValue().getAsString());
      }
      assertEquals(vector.get("sha256_hex").getAsString(), HexFormat.of().formatHex(Keys.fingerprint(fields)),
          vector.toString());
      // Bytes and text hash alike.
      Map<String, Object> raw = new LinkedHashMap<>();
      fields.forEach((name, value) -> raw.put(name, ((String) value).getBytes(StandardCharsets.UTF_8)));
      assertEquals(vector.get("sha256_hex").getAsString(), HexFormat.of().formatHex(Keys.fingerprint(raw)));
      fingerprints++;
    }
    assertFalse(keys == 0 || fingerprints == 0, "the vectors file has no cases");
    assertFalse(Arrays.equals(Keys.fingerprint(Map.of("a", "bc")), Keys.fingerprint(Map.of("ab", "c"))));
  }

  @Test
  void fieldsAreSortedByCodePointNotByUtf16() {
    // U+FF01 sorts before U+1F600 in code points (and in UTF-8), after it in UTF-16 code units.
    Map<String, Object> fields = new LinkedHashMap<>();
    fields.put("\uFF01", "x");
    fields.put("\uD83D\uDE00", "y");
    Map<String, Object> reversed = new LinkedHashMap<>();
    reversed.put("\uD83D\uDE00", "y");
    reversed.put("\uFF01", "x");
    assertEquals(HexFormat.of().formatHex(Keys.fingerprint(fields)), HexFormat.of().formatHex(Keys.fingerprint(reversed)));
  }
}
